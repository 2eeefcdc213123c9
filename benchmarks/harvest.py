"""``python -m benchmarks.harvest``: harvest throughput against plain HF, and bounded memory.

Throughput: the same batches (built by harvest's own encoder, so padding and position ids
are identical) through the plain HF model, ``model(**batch)``, and through its base model
(``model.base_model``: every layer, no LM head), against ``harvest(...)`` end to end (JSONL
read, tokenizer or processor with images from PNG files, forward, row selection, shards,
index). Every variant runs once per round in a shuffled order (`benchmarks.timing`), and
throughput is input tokens per second. Models: the GPT-2 small config and the benchmarks'
tiny LLaVA (224 px images).

Memory: fresh processes harvest 200 and 2,000 examples (a 4-layer GPT-2, d_model 256, every
position of two hooks, 100 examples per shard) and report their peak RSS (Linux VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks import models, timing

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "USER: <image>\nWhat is in this picture? ASSISTANT:"
TARGET = 0.90  # harvest tokens/s >= 90 % of plain HF forward tokens/s
MEMORY_TARGET = 0.10  # peak RSS of 2,000 examples within 10 % of 200


def texts(n: int, words: int) -> list[str]:
    """`n` different English texts of about `words` words."""
    from bridge_adapters.tiny import CORPUS

    vocab = CORPUS.split()
    return [" ".join(vocab[(i * 7 + j) % len(vocab)] for j in range(words)) for i in range(n)]


def gpt2_small(folder: Path) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """The GPT-2 small config (random weights, the tiny tokenizer) and 64-token texts."""
    from bridge_adapters.tiny import build_tokenizer, init_model
    from bridge_core import TransformerBridge

    model = init_model(transformers.GPT2LMHeadModel, transformers.GPT2Config(), seed=0)
    bridge = TransformerBridge.wrap(model, tokenizer=build_tokenizer(512))
    rows = [{"id": i, "text": t} for i, t in enumerate(texts(16, 48))]
    options = {"hooks": "blocks.11.hook_resid_post", "batch_size": 4, "max_length": 64}
    return bridge, rows, options


def tiny_llava(folder: Path) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """The benchmarks' tiny LLaVA (224 px, 256 image tokens) and prompts with PNG images."""
    from bridge_core import TransformerBridge

    tiny = models._llava_tiny_module()
    model, processor = tiny.tiny_llava(
        vision_layers=4, text_layers=4, image_size=224, patch_size=14, vision_hidden=64,
        text_hidden=128,
    )  # fmt: skip
    rows = []
    for i in range(32):
        tiny.tiny_image(224, kind="gradient" if i % 2 else "checkerboard", seed=i).save(
            folder / f"img{i}.png"
        )
        rows.append({"id": i, "text": PROMPT, "images": [f"img{i}.png"]})
    bridge = TransformerBridge.wrap(model, processor=processor)
    return bridge, rows, {"hooks": "blocks.3.hook_resid_post", "batch_size": 4}


CASES: dict[str, Callable[[Path], tuple[Any, list[dict[str, Any]], dict[str, Any]]]] = {
    "small": gpt2_small,
    "llava": tiny_llava,
}


def throughput(name: str, rounds: int, warmup: int, clock: str) -> dict[str, Any]:
    """Tokens/s of plain HF forwards and of `harvest` on the same batches."""
    from bridge_core.data import open_source
    from bridge_core.harvest import harvest
    from bridge_core.harvest_run import encode

    folder = Path(tempfile.mkdtemp(prefix=f"harvest-bench-{name}-"))
    try:
        bridge, rows, options = CASES[name](folder)
        data = folder / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        source = open_source(data)
        examples = list(source.examples(lambda i: True))
        size = options["batch_size"]
        batches = []
        for start in range(0, len(examples), size):
            batch = encode(
                bridge, examples[start : start + size], source, options.get("max_length")
            )
            mask = batch["attention_mask"]
            batches.append({**batch, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)})
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        model = bridge.original_model

        def hf(module: Any) -> Callable[[], object]:
            def run() -> object:
                with torch.inference_mode():
                    return [module(**b) for b in batches]

            return run

        def script() -> object:  # what a hand-written loop does: read, encode, forward
            from PIL import Image

            done = []
            with torch.inference_mode():
                for start in range(0, len(rows), size):
                    part = rows[start : start + size]
                    encoded = _encode_plainly(bridge, part, folder, Image.open)
                    done.append(model(**encoded))
            return done

        def harvested() -> object:
            out = folder / "out"
            shutil.rmtree(out, ignore_errors=True)
            return harvest(bridge, data, out=out, progress=False, **options)

        variants = {"hf_forward": hf(model), "hf_base_model": hf(model.base_model),
                    "hf_script": script, "harvest": harvested}  # fmt: skip
        stats = timing.interleave(variants, rounds, warmup, 1, seed=0, clock=clock)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result: dict[str, Any] = {"tokens_per_round": tokens, "examples": len(rows), **options}
    for variant, stat in stats.items():
        result[variant] = {
            "tokens_per_s_median": tokens / stat.median,
            "tokens_per_s_best": tokens / stat.min,
            "samples_s": list(stat.samples),
        }
    return result


def _encode_plainly(bridge: Any, rows: list[dict[str, Any]], folder: Path, open_image: Any) -> Any:
    """The batch as a plain HF script encodes it: tokenizer or processor, left padding."""
    texts = [r["text"] for r in rows]
    if any(r.get("images") for r in rows):
        images = [open_image(folder / p).convert("RGB") for r in rows for p in r["images"]]
        return bridge.processor(text=texts, images=images, return_tensors="pt", padding=True,
                                padding_side="left")  # fmt: skip
    return bridge.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                            truncation=True, max_length=64)  # fmt: skip


# -- memory, in fresh processes ------------------------------------------------------------


def memory_probe(n: int) -> dict[str, Any]:
    """Inside a fresh process: peak RSS of harvesting `n` examples (bytes)."""
    from bridge_adapters.tiny import build_tokenizer, init_model
    from bridge_core import TransformerBridge
    from bridge_core.harvest import harvest

    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=512)
    bridge = TransformerBridge.wrap(
        init_model(transformers.GPT2LMHeadModel, config, 0), tokenizer=build_tokenizer(512)
    )
    folder = Path(tempfile.mkdtemp(prefix="harvest-memory-"))
    try:
        data = folder / "data.jsonl"
        with data.open("w", encoding="utf-8") as file:
            for i, text in enumerate(texts(n, 24)):
                file.write(json.dumps({"id": i, "text": text}) + "\n")
        hooks = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
        warm = [{"text": t} for t in texts(8, 24)]
        harvest(bridge, warm, hooks, folder / "warm", batch_size=8, progress=False)
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        reader = harvest(bridge, data, hooks, folder / "out", batch_size=8, shard_size=100,
                         progress=False)  # fmt: skip
        peak = _status_kib("VmHWM")
        stored = sum(p.stat().st_size for p in (folder / "out" / "shards").iterdir())
        return {
            "examples": n,
            "rows": len(reader),
            "stored_bytes": stored,
            "rss_before_bytes": before * 1024,
            "peak_rss_bytes": peak * 1024,
            "peak_above_before_bytes": (peak - before) * 1024,
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory(sizes: tuple[int, ...], threads: int | None) -> dict[str, Any]:
    """Peak RSS per dataset size, each in a fresh process (glibc told to trim eagerly)."""
    from benchmarks.process import MEMORY_ENV

    env = {**os.environ, **MEMORY_ENV, "TOKENIZERS_PARALLELISM": "false"}
    args = ["--threads", str(threads)] if threads else []
    found = {}
    for n in sizes:
        command = [sys.executable, "-m", "benchmarks.harvest", "--memory-probe", str(n), *args]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"memory probe for {n} examples failed:\n{done.stderr}")
        found[str(n)] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


# -- report ----------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    """The results as markdown tables with verdicts."""
    lines = [
        "| model | tokens / round | HF forward tok/s | HF base model tok/s | HF script tok/s "
        "| harvest tok/s | harvest / HF forward | harvest / HF base model | harvest / HF script "
        "| target | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, case in result["throughput"].items():
        variants = ("hf_forward", "hf_base_model", "hf_script", "harvest")
        hf, base, plain, ours = (case[k]["tokens_per_s_median"] for k in variants)
        ratio = ours / hf
        lines.append(
            f"| {name} | {case['tokens_per_round']:,} | {hf:,.0f} | {base:,.0f} | {plain:,.0f} "
            f"| {ours:,.0f} | {ratio:.2f} | {ours / base:.2f} | {ours / plain:.2f} "
            f"| >= {TARGET:.2f} "
            f"| {'met' if ratio >= TARGET else 'missed'} |"
        )
    if result.get("memory"):
        lines += ["", "| examples | rows | shards on disk | peak RSS | peak above start |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for probe in result["memory"].values():
            lines.append(
                f"| {probe['examples']:,} | {probe['rows']:,} | {_mib(probe['stored_bytes'])} "
                f"| {_mib(probe['peak_rss_bytes'])} | {_mib(probe['peak_above_before_bytes'])} |"
            )
        peaks = [p["peak_rss_bytes"] for p in result["memory"].values()]
        growth = max(peaks) / min(peaks) - 1
        verdict = "met" if growth <= MEMORY_TARGET else "missed"
        lines += ["", f"Peak RSS, largest vs smallest dataset: {growth:+.1%} (target within "
                      f"{MEMORY_TARGET:.0%}): {verdict}."]  # fmt: skip
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    """Run the harvest benchmarks; print markdown, write JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harvest", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--models", default="small,llava", help="comma-separated: small, llava")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--clock", choices=sorted(timing.CLOCKS), default="wall")
    parser.add_argument("--sizes", default="200,2000", help="dataset sizes for peak RSS")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with models.quiet_transformers():
        if args.memory_probe is not None:
            print(json.dumps(memory_probe(args.memory_probe)))
            return 0
        command = " ".join(["python -m benchmarks.harvest", *(argv or sys.argv[1:])])
        result: dict[str, Any] = {"command": command, "throughput": {}, "torch": torch.__version__,
                                  "threads": torch.get_num_threads()}  # fmt: skip
        for name in [m for m in args.models.split(",") if m]:
            print(f"[harvest bench] {name}: {args.rounds} rounds", file=sys.stderr, flush=True)
            result["throughput"][name] = throughput(name, args.rounds, args.warmup, args.clock)
        sizes = tuple(int(s) for s in args.sizes.split(",") if s)
        if sizes:
            print(f"[harvest bench] peak RSS for {sizes}", file=sys.stderr, flush=True)
            result["memory"] = memory(sizes, args.threads)
    print(markdown(result))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"harvest-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"[harvest bench] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
