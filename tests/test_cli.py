"""The ``transformer-bridge`` CLI, called in-process as a user would type it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from bridge_adapters import tiny
from bridge_core import AdapterSpec, TransformerBridge, get_registry
from bridge_core.cli import main
from bridge_core.cli.demo import CACHE_ENV, DEFAULT_DIR, default_model
from bridge_core.cli.render import Output

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty CLI cache and an empty, offline Hugging Face cache for every test."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "tb-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Run:
    """``cli("run", MODEL, ...)`` -> (exit code, stdout, stderr)."""

    def run(*argv: str | Path) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLI cache holding the embedded default model, built once."""
    pytest.importorskip("bridge_llava")
    root = tmp_path_factory.mktemp("tb-demo-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root))
        default_model(fresh=False, out=Output(plain=True))
    return root


@pytest.fixture
def llava_dir(demo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default model's directory, with the CLI cache pointing at it."""
    monkeypatch.setenv(CACHE_ENV, str(demo_cache))
    return demo_cache / DEFAULT_DIR


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transformer-bridge: error: "), err
    return lines[0]


# -- parsing, help and exit codes ----------------------------------------------------------


@pytest.mark.parametrize(
    "argv", [["--help"], ["demo", "--help"], ["run", "--help"], ["spec", "validate", "--help"]]
)
def test_help_everywhere(cli: Run, argv: list[str]) -> None:
    code, out, _ = cli(*argv)
    assert code == 0 and "usage: transformer-bridge" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["run", "some/model"], "required: --prompt"),
        (["spec", "show", "gpt2", "--format", "yaml"], "invalid choice: 'yaml'"),
        (["attention-map", "m", "--prompt", "p", "--layer", "0", "--out", "o.png"], "--image"),
    ],
)
def test_usage_errors_exit_2(cli: Run, argv: list[str], message: str) -> None:
    code, _, err = cli(*argv)
    assert code == 2 and message in err


def test_the_installed_console_script_runs() -> None:
    script = Path(sys.executable).with_name("transformer-bridge")
    found = str(script) if script.exists() else shutil.which("transformer-bridge")
    assert found, "the console script is not installed: pip install -e ."
    result = subprocess.run([found, "--plain", "plugins"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "bridge_adapters.plugin" in result.stdout and "transformer-bridge" in result.stdout


# -- registry and specs --------------------------------------------------------------------


def test_architectures_names_each_adapter_and_its_distribution(cli: Run) -> None:
    code, out, _ = cli("--plain", "architectures")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "GPT2LMHeadModel" in rows["gpt2"] and "transformer-bridge 0.1.0" in rows["gpt2"]
    assert "MistralForCausalLM" in rows["llama"]


def test_plugins_lists_load_errors_with_the_original_message(
    cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    site = tmp_path / "site"
    dist = site / "tb_cli_broken-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tb-cli-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[transformer_bridge]\nbroken = tb_cli_broken\n")
    (site / "tb_cli_broken.py").write_text("raise ImportError('tb_fast_kernels is missing')\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("TRANSFORMER_BRIDGE_DISABLE_PLUGIN_AUTOLOAD", raising=False)

    code, out, err = cli("--plain", "plugins")

    assert code == 1
    assert "bridge_adapters.plugin" in out and "embedding" in out
    error_rows = [line for line in out.splitlines() if line.startswith("broken ")]
    assert error_rows and "tb_fast_kernels is missing" in error_rows[0]
    assert "warning" not in err  # listed, not warned about twice
    sys.modules.pop("tb_cli_broken", None)


def test_plugins_lists_a_plugin_that_exits_at_import(
    cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    """Issue 11: a plugin calling sys.exit() at import silenced the CLI."""
    site = tmp_path / "site"
    dist = site / "tb_cli_exits-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tb-cli-exits\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[transformer_bridge]\nexits = tb_cli_exits\n")
    (site / "tb_cli_exits.py").write_text("import sys\nsys.exit(4)\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("TRANSFORMER_BRIDGE_DISABLE_PLUGIN_AUTOLOAD", raising=False)

    code, out, _ = cli("--plain", "plugins")

    assert code == 1
    assert "bridge_adapters.plugin" in out
    rows = [line for line in out.splitlines() if line.startswith("exits ")]
    assert rows and "SystemExit(4)" in rows[0]
    sys.modules.pop("tb_cli_exits", None)


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_spec_show_prints_a_spec_that_round_trips(cli: Run, fmt: str) -> None:
    code, out, _ = cli("spec", "show", "llama", "--format", fmt)
    assert code == 0
    data = tomllib.loads(out) if fmt == "toml" else json.loads(out)
    assert AdapterSpec.model_validate(data) == get_registry().adapter("llama")


def test_spec_show_unknown_name_suggests_the_close_one(cli: Run) -> None:
    code, _, err = cli("spec", "show", "lama")
    line = one_error_line(err)
    assert (
        code == 2
        and "Did you mean 'llama'" in line
        and "Known adapters: " in line
        and "gpt2" in line
    )


def test_spec_validate(cli: Run, tmp_path: Path) -> None:
    good = tmp_path / "mine.toml"
    good.write_text(get_registry().adapter("gpt2").to_toml())
    code, out, _ = cli("--plain", "spec", "validate", good)
    assert code == 0 and "valid adapter spec 'gpt2'" in out

    unknown_kind = tmp_path / "kind.toml"
    unknown_kind.write_text(good.read_text().replace('kind = "embedding"', 'kind = "embeding"'))
    code, _, err = cli("spec", "validate", unknown_kind)
    line = one_error_line(err)
    assert code == 1 and "components.embed.kind" in line and "Did you mean 'embedding'" in line

    invalid = tmp_path / "bad.json"
    invalid.write_text('{"name": "x", "components": {}}')
    code, _, err = cli("spec", "validate", invalid)
    assert code == 1 and "architectures: Field required" in one_error_line(err)

    code, _, err = cli("spec", "validate", tmp_path / "missing.toml")
    assert code == 2 and "does not exist" in one_error_line(err)


# -- hooks and run on a text model ---------------------------------------------------------


def test_hooks_shows_the_tree_with_shapes_and_aliases(cli: Run, saved_gpt2: Path) -> None:
    code, out, _ = cli("--plain", "hooks", saved_gpt2, "--filter", "resid_pre")
    assert code == 0
    lines = [line.strip() for line in out.splitlines()]
    assert "blocks  2 x BlockBridge" in lines
    hook_in = next(line for line in lines if line.startswith("hook_in ["))
    assert hook_in.endswith("= blocks.0.hook_resid_pre")
    assert not any("attn" in line for line in lines)  # filtered out


def test_run_saves_the_cache_with_its_metadata(cli: Run, saved_gpt2: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache.safetensors"
    prompt = "The cat sat on the mat"
    argv = ("--plain", "run", saved_gpt2, "--prompt", prompt, "--save", target)
    code, out, _ = cli(*argv, "--names", "blocks.*.hook_resid_post", "hook_embed")
    assert code == 0 and "Saved 3 activations" in out and "Next token" in out

    bridge = TransformerBridge.boot(saved_gpt2)
    expected_names = ["embed.hook_out", "blocks.0.hook_out", "blocks.1.hook_out"]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(prompt, names_filter=expected_names)
    with safe_open(str(target), "pt") as saved:
        meta = saved.metadata()
        for name in expected_names:
            assert torch.equal(saved.get_tensor(name), cache[name])
    assert meta["model"] == str(saved_gpt2) and meta["adapter"] == "gpt2"
    assert meta["prompt"] == prompt
    assert json.loads(meta["names"]) == expected_names
    assert json.loads(meta["shapes"])["blocks.0.hook_out"] == list(cache["blocks.0.hook_out"].shape)
    assert json.loads(meta["aliases"])["hook_embed"] == "embed.hook_out"
    assert json.loads(meta["input_ids"]) == bridge.to_tokens(prompt)[0].tolist()


# -- bad input: one line, naming the problem and what is accepted ---------------------------


def test_names_matching_nothing(cli: Run, saved_gpt2: Path) -> None:
    code, _, err = cli("run", saved_gpt2, "--prompt", "hi", "--names", "blocks.7.hook_resid_post")
    line = one_error_line(err)
    assert code == 2 and "matches no hook point" in line
    assert "Did you mean 'blocks.1.hook_resid_post'" in line and "glob patterns" in line


def test_an_empty_prompt_is_run_or_refused_never_replaced(
    cli: Run, saved_gpt2: Path, tmp_path: Path
) -> None:
    """Issue 11: --prompt "" ran the default prompt instead. It runs on the BOS token alone."""
    code, out, _ = cli("--plain", "run", saved_gpt2, "--prompt", "")
    assert code == 0 and "'', 1 tokens" in out
    assert "quick brown fox" not in out
    code, out, _ = cli("--plain", "hooks", saved_gpt2, "--prompt", "")  # the dry run, too
    assert code == 0 and "quick brown fox" not in out
    # a tokenizer without BOS makes no token of it: a usage error naming --prompt
    model, tokenizer = tiny.tiny_gpt2()
    tokenizer.bos_token = None
    no_bos = tiny.save_pretrained(model, tokenizer, tmp_path / "no-bos")
    code, _, err = cli("run", no_bos, "--prompt", "")
    assert code == 2
    last = err.strip().splitlines()[-1]  # after save_pretrained's progress bar
    assert last.startswith("transformer-bridge: error: --prompt '': the text input '' tokenizes")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--names", ","), "--names ',' names no hook point"),
        (("--names", " , ", ","), "names no hook point"),
        (("--top-k", "-3"), "argument --top-k: '-3' is no integer >= 0"),
        (("--device", "gpu"), "argument --device: 'gpu' is no torch device"),
        (("--device", "cuda:99"), "argument --device: 'cuda:99': this machine has"),
        (("--device", "meta"), "argument --device: 'meta' holds no weights"),
    ],
)
def test_bad_run_options_are_usage_errors(
    cli: Run, saved_gpt2: Path, option: tuple[str, ...], message: str
) -> None:
    """Issue 11: --names , and --top-k -3 were accepted; a bad --device exited 1."""
    code, _, err = cli("run", saved_gpt2, "--prompt", "hi", *option)
    assert code == 2 and message in err, err
    assert "Accepted:" in err or "integer" in err


def test_unknown_models(cli: Run, tmp_path: Path) -> None:
    code, _, err = cli("hooks", tmp_path / "nowhere")
    assert code == 2 and "does not exist. Accepted: a local directory" in one_error_line(err)
    code, _, err = cli("hooks", tmp_path)
    assert code == 2 and "has no config.json" in one_error_line(err)
    code, _, err = cli("hooks", "nobody/tiny-model")
    line = one_error_line(err)
    assert code == 2 and "HF_HUB_OFFLINE is set" in line and "Accepted:" in line


def test_unknown_adapter_name(cli: Run, saved_gpt2: Path) -> None:
    code, _, err = cli("hooks", saved_gpt2, "--adapter", "gtp2")
    line = one_error_line(err)
    assert code == 2 and "Did you mean 'gpt2'" in line and "Known adapters:" in line


def test_unreadable_images(cli: Run, saved_gpt2: Path, tmp_path: Path) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not pixels")
    code, _, err = cli("run", saved_gpt2, "--prompt", "hi", "--image", not_an_image)
    assert code == 2 and "cannot read image" in one_error_line(err) and "Accepted:" in err
    code, _, err = cli("run", saved_gpt2, "--prompt", "hi", "--image", tmp_path / "none.png")
    assert code == 2 and "does not exist" in one_error_line(err)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    code, _, err = cli("run", saved_gpt2, "--prompt", "hi", "--image", tmp_path / "ok.png")
    assert code == 2 and "takes no images" in one_error_line(err)


def test_debug_shows_the_traceback(cli: Run, tmp_path: Path) -> None:
    code, _, err = cli("--debug", "hooks", tmp_path / "nowhere")
    assert code == 2 and "Traceback" in err and "transformer-bridge: error:" in err


def test_unexpected_errors_are_one_line_with_a_hint(
    cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any) -> int:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("bridge_core.cli.listing.cmd_architectures", boom)
    code, _, err = cli("architectures")
    line = one_error_line(err)
    assert code == 1 and "RuntimeError: disk on fire" in line and "--debug" in line


def test_plain_text_without_rich(cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich.console", None)  # import fails as if uninstalled
    code, out, _ = cli("architectures")
    assert code == 0 and out.splitlines()[1] == "Adapters" and "┃" not in out


# -- the demo ------------------------------------------------------------------------------


def test_demo_default_model(cli: Run, llava_dir: Path, tmp_path: Path) -> None:
    code, out, _ = cli("demo")  # rich output
    assert code == 0, out
    assert "(cached; --fresh rebuilds it)" in out and str(llava_dir) in out
    assert "llava (plugin llava, transformer-bridge-llava" in out
    for name in ("vision_encoder.hook_out", "vision_projector.hook_out", "blocks.0.hook_in"):
        assert name in out
    assert "Image tokens: 16 of" in out
    assert "vision_projector.hook_out equals blocks.0.hook_in at the image positions" in out
    assert "equal the plain HF model's exactly" in out
    picture = llava_dir.parent / "demo-attention-map.png"  # in the CLI cache directory
    assert f"Wrote {picture}: attention of position" in out.replace("\n", "")
    with Image.open(picture) as written:
        assert written.size == (256, 256)


def test_demo_builds_the_default_once(
    cli: Run, llava_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    built: list[int] = []

    def counting_builder() -> tuple[Any, Any]:  # loads the session's build: faster than building
        built.append(1)
        model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
        processor: Any = AutoProcessor  # from_pretrained is unannotated in transformers
        return model, processor.from_pretrained(llava_dir)

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.setattr("bridge_llava.tiny.tiny_llava", counting_builder)
    assert cli("--plain", "demo")[0] == 0
    code, out, _ = cli("--plain", "demo")
    assert code == 0 and built == [1] and "(cached; --fresh rebuilds it)" in out
    code, out, _ = cli("--plain", "demo", "--fresh")
    assert code == 0 and built == [1, 1] and "(built just now)" in out


def test_demo_text_model_and_user_image(cli: Run, saved_gpt2: Path, llava_dir: Path) -> None:
    code, out, _ = cli("--plain", "demo", saved_gpt2)
    assert code == 0 and "Image tokens" not in out and "exactly" in out
    image = llava_dir.parent / "red.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    code, out, _ = cli("--plain", "demo", llava_dir, "--image", image, "--prompt", "Red?")
    assert code == 0 and str(image) in out and "Image tokens: 16 of" in out


def test_demo_reports_differing_logits(
    cli: Run, saved_gpt2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "equal", lambda a, b: False)
    code, out, _ = cli("--plain", "demo", saved_gpt2)
    assert code == 1 and "FAILED: the logits differ" in out


def test_demo_without_the_llava_plugin(cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bridge_core.cli.demo.DEMO_GROUP", "tb_no_such_group")
    code, _, err = cli("demo")
    line = one_error_line(err)
    assert code == 1 and "demo's default model" in line and "pip install" in line


def test_demo_fresh_applies_only_to_the_default(cli: Run, saved_gpt2: Path) -> None:
    code, _, err = cli("demo", saved_gpt2, "--fresh")
    assert code == 2 and "--fresh" in one_error_line(err)


def test_run_on_the_llava_model_caches_vision_hooks_only_with_an_image(
    cli: Run, llava_dir: Path, tmp_path: Path
) -> None:
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (0, 100, 200)).save(image)
    names = ("--names", "vision_projector.*", "blocks.0.hook_in")
    code, out, _ = cli("--plain", "run", llava_dir, "--prompt", "Hi", *names, "--image", image)
    assert code == 0 and "vision_projector.hook_out" in out and "[1, 16, 64]" in out
    code, out, _ = cli("--plain", "run", llava_dir, "--prompt", "Hi", *names)
    assert code == 0 and "2 selected hook points did not fire" in out


def test_only_the_running_subcommand_is_imported() -> None:
    code = (
        "import sys\n"
        "from bridge_core.cli import main\n"
        "def loaded(): return sorted(m for m in sys.modules if m.startswith('bridge_core.cli.'))\n"
        "assert main(['--help']) == 0\n"
        "print('loaded:', loaded())\n"
        "assert main(['--plain', 'architectures']) == 0\n"
        "print('loaded:', loaded())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("loaded: ")]
    after_help, after_architectures = lines
    assert after_help == "loaded: ['bridge_core.cli.app', 'bridge_core.cli.render']"
    assert "bridge_core.cli.listing" in after_architectures
    for other in ("demo", "hooks", "model", "run", "spec"):
        assert f"bridge_core.cli.{other}'" not in after_architectures


def test_the_full_parser_sets_up_every_subcommand() -> None:
    from bridge_core.cli.app import build_parser
    from bridge_core.cli.spec import cmd_spec_show

    parser = build_parser()  # every subcommand at once (for tools such as shell completion)
    args = parser.parse_args(["run", "some/model", "--prompt", "hi", "--plain"])
    assert args.top_k == 5 and args.plain and args.model == "some/model"
    assert parser.parse_args(["spec", "show", "gpt2"]).handler is cmd_spec_show
    assert parser.parse_args(["demo"]).model is None


# -- attention maps --------------------------------------------------------------------------


def test_attention_map_paints_the_attention_to_the_image(
    cli: Run, llava_dir: Path, tmp_path: Path
) -> None:
    from bridge_core.multimodal import attention_to_image

    image = tmp_path / "wide.png"
    Image.new("RGB", (100, 60), (20, 200, 20)).save(image)
    args = ("--image", image, "--prompt", "What?", "--layer", "-1", "--head", "1", "--query", "-2")
    code, out, _ = cli("--plain", "attention-map", llava_dir, *args, "--out", tmp_path / "m.png")
    assert code == 0 and f"Wrote {tmp_path / 'm.png'}: attention of position" in out
    assert "layer 1, head 1; most at patch" in out
    with Image.open(tmp_path / "m.png") as written:
        assert written.size == (256, 154)  # the image's aspect ratio, longest side 256
        pixels = written.convert("RGB")
        assert pixels.getpixel((5, 77)) == (20, 200, 20)  # cropped away by the processor
    bridge = TransformerBridge.boot(llava_dir)
    with Image.open(image) as img:
        _, cache = bridge.run_with_cache(
            "USER: <image>\nWhat? ASSISTANT:", images=[img.convert("RGB")]
        )
    grid = attention_to_image(cache, -1, head=1, query=-2)
    row, col = divmod(int(grid.argmax()), 4)
    assert f"most at patch ({row}, {col})" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--layer", "2"), "--layer 2 is out of range: the model has 2 blocks"),
        (("--layer", "0", "--head", "9"), "--head 9 is out of range: the model has 4 heads"),
        (("--layer", "0", "--query", "999"), "--query 999 is out of range"),
    ],
)
def test_attention_map_bad_indices(
    cli: Run, llava_dir: Path, tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    code, _, err = cli(
        "attention-map",
        llava_dir,
        "--image",
        image,
        "--prompt",
        "Hi",
        *extra,
        "--out",
        tmp_path / "m.png",
    )
    assert code == 2 and message in one_error_line(err)


def test_attention_map_of_a_text_model(cli: Run, saved_gpt2: Path, tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    code, _, err = cli(
        "attention-map",
        saved_gpt2,
        "--image",
        image,
        "--prompt",
        "Hi",
        "--layer",
        "0",
        "--out",
        tmp_path / "m.png",
    )
    assert code == 2 and "takes no images" in one_error_line(err)
