"""The ``transformer-bridge`` command: the demo, registry listings, hook trees, cached runs, specs.

Exit codes: 0 success; 1 failure (the input exists but the work failed: an invalid spec,
a model that does not load, a plugin that failed, a logits mismatch); 2 usage error (bad
options, or a model, adapter, file, image or hook name that does not exist). Errors print
as one line, ``transformer-bridge: error: ...``; ``--debug`` adds the traceback.

The subcommands live in ``cli_registry``, ``cli_run`` and ``cli_demo`` (with shared model
handling in ``cli_model``) and are imported only when they run. rich (the ``cli`` extra) is
optional: see ``cli_render``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from bridge_core.cli_render import Output
from bridge_core.errors import BridgeError

PROG = "transformer-bridge"
Handler = Callable[[argparse.Namespace, Output], int]


class UsageError(Exception):
    """The command line names something that does not exist or cannot be read (exit 2)."""


class CommandFailed(Exception):
    """The command ran but its work failed (exit 1)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with `argv` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits for --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    debug = bool(args.debug)
    handler: Handler = args.handler
    try:
        with _one_line_warnings(debug), _quiet_transformers(debug):
            return handler(args, Output(plain=args.plain))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # piped into a reader that stopped early (`... | head`)
        _silence_stdout()
        return 1
    except UsageError as exc:
        return _fail(exc, 2, debug)
    except (CommandFailed, BridgeError) as exc:
        return _fail(exc, 1, debug)
    except Exception as exc:
        return _fail(exc, 1, debug, unexpected=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. captured output)
        pass


def one_line(message: str) -> str:
    """A (possibly multi-line) error message as one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    joined = lines[0] if lines else ""
    for line in lines[1:]:
        joined += (" " if joined.endswith((":", ".")) else "; ") + line
    return joined


def _fail(exc: BaseException, code: int, debug: bool, unexpected: bool = False) -> int:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    message = one_line(str(exc))
    if unexpected:
        hint = "" if debug else " (--debug shows the traceback)"
        message = f"{type(exc).__name__}: {message}{hint}"
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


@contextmanager
def _one_line_warnings(debug: bool) -> Iterator[None]:
    """Print warnings as ``transformer-bridge: warning: ...``; library deprecations only with
    ``--debug``."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        print(f"{PROG}: warning: {one_line(str(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.showwarning = show
        yield


@contextmanager
def _quiet_transformers(debug: bool) -> Iterator[None]:
    """No transformers progress bars or info logs on the CLI's output (restored afterwards)."""
    if debug:
        yield
        return
    from transformers.utils import logging

    hf_logging: Any = logging  # its helpers are unannotated; Any keeps mypy --strict quiet
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``transformer-bridge`` and its subcommands."""
    # --debug/--plain work before or after the subcommand; SUPPRESS keeps a subcommand's
    # default from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error",
    )
    common.add_argument(
        "--plain",
        action="store_true",
        default=argparse.SUPPRESS,
        help="plain-text output (no rich tables)",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="TransformerLens-style hook points on unchanged HuggingFace models.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage error. Docs: docs/cli.md",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--plain", action="store_true", help="plain-text output (no rich)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(commands, common)
    _add(
        commands,
        common,
        "architectures",
        _lazy("cli_registry", "cmd_architectures"),
        "list adapters and their plugins",
    )
    _add(
        commands,
        common,
        "plugins",
        _lazy("cli_registry", "cmd_plugins"),
        "list loaded plugins and load errors",
    )
    _add_hooks(commands, common)
    _add_run(commands, common)
    _add_spec(commands, common)
    return parser


def _add(
    commands: Any, common: argparse.ArgumentParser, name: str, handler: Handler, help: str
) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(
        name, parents=[common], help=help, description=help[0].upper() + help[1:] + "."
    )
    sub.set_defaults(handler=handler)
    return sub


def _model_options(
    sub: argparse.ArgumentParser, model_required: bool = True, image_default: bool = True
) -> None:
    nargs = None if model_required else "?"
    sub.add_argument(
        "model",
        nargs=nargs,
        metavar="MODEL",
        help="local model directory or hub id (HF cache and offline rules apply)",
    )
    sub.add_argument(
        "--adapter",
        metavar="NAME|FILE",
        help="adapter name or TOML/JSON spec file (default: chosen by the registry)",
    )
    sub.add_argument("--device", default="cpu", help="device to run on (default: cpu)")
    sub.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16", "auto"),
        help="weights dtype (default: HF's default)",
    )
    sub.add_argument(
        "--image",
        metavar="PATH",
        type=Path,
        help="image file for a multimodal model (default: "
        + ("a generated one)" if image_default else "none, a text-only run)"),
    )


def _add_demo(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _add(
        commands,
        common,
        "demo",
        _lazy("cli_demo", "cmd_demo"),
        "boot a model, cache a run, show its hooks and check exactness against HF",
    )
    _model_options(sub, model_required=False)
    sub.add_argument("--prompt", help="prompt text (default: a short question)")
    sub.add_argument(
        "--fresh", action="store_true", help="rebuild the embedded default model (no MODEL)"
    )


def _add_hooks(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _add(
        commands,
        common,
        "hooks",
        _lazy("cli_run", "cmd_hooks"),
        "show the hook tree of a model, with shapes from a dry run",
    )
    _model_options(sub)
    sub.add_argument(
        "--filter", metavar="SUBSTR", help="only hook names (or aliases) containing SUBSTR"
    )
    sub.add_argument("--prompt", help="prompt of the dry run (default: a short sentence)")


def _add_run(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _add(
        commands,
        common,
        "run",
        _lazy("cli_run", "cmd_run"),
        "run a prompt through run_with_cache and show (or save) the activations",
    )
    _model_options(sub, image_default=False)
    sub.add_argument("--prompt", required=True, help="prompt text")
    sub.add_argument(
        "--names",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="hook names, aliases or glob patterns to cache, e.g. "
        "'blocks.*.hook_resid_post' (default: all)",
    )
    sub.add_argument(
        "--save",
        metavar="FILE.safetensors",
        type=Path,
        help="save the cache with safetensors (JSON metadata in the header)",
    )
    sub.add_argument(
        "--top-k",
        type=int,
        default=5,
        metavar="K",
        help="show the K most likely next tokens (default: 5; 0: none)",
    )


def _add_spec(commands: Any, common: argparse.ArgumentParser) -> None:
    spec = commands.add_parser(
        "spec",
        parents=[common],
        help="show or validate adapter specs",
        description="Show or validate adapter specs.",
    )
    actions = spec.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = _add(
        actions,
        common,
        "show",
        _lazy("cli_registry", "cmd_spec_show"),
        "print a registered adapter's spec",
    )
    show.add_argument("name", metavar="NAME", help="adapter name (see `architectures`)")
    show.add_argument("--format", choices=("toml", "json"), default="toml")
    validate = _add(
        actions,
        common,
        "validate",
        _lazy("cli_registry", "cmd_spec_validate"),
        "check a TOML/JSON spec file",
    )
    validate.add_argument("file", metavar="FILE", type=Path, help="a .toml or .json spec")


def _lazy(module: str, function: str) -> Handler:
    """A handler imported from ``bridge_core.<module>`` when the subcommand runs."""

    def run(args: argparse.Namespace, out: Output) -> int:
        import importlib

        handler: Handler = getattr(importlib.import_module(f"bridge_core.{module}"), function)
        return handler(args, out)

    return run


def _version() -> str:
    from bridge_core import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
