"""The ``transformer-bridge`` command: the parser, dispatch, exit codes and error lines.

Exit codes: 0 success; 1 failure (the input exists but the work failed: an invalid spec,
a model that does not load, a plugin that failed, a logits mismatch); 2 usage error (bad
options, or a model, adapter, file, image or hook name that does not exist). Errors print
as one line, ``transformer-bridge: error: ...``; ``--debug`` adds the traceback.

Each subcommand is one module of this package, registered by one line in ``COMMANDS``: its
``setup(parser)`` adds the subcommand's arguments and sets ``handler``. Only the module of the
subcommand being run is imported (``--help`` and the registry listings import no model code);
``model`` holds what the model commands share, ``render`` the output (rich is optional).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from bridge_core.cli.render import Output
from bridge_core.errors import BridgeError

PROG = "transformer-bridge"
Handler = Callable[[argparse.Namespace, Output], int]


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, ``module:function`` (a module of this package) of the function
    that adds its arguments and handler to its parser, and its one-line help."""

    name: str
    setup: str
    help: str


# One line per subcommand, in the order ``--help`` lists them.
COMMANDS = (
    Command(
        "demo",
        "demo:setup",
        "boot a model, cache a run, show its hooks and check exactness against HF",
    ),
    Command("architectures", "listing:setup_architectures", "list adapters and their plugins"),
    Command("plugins", "listing:setup_plugins", "list loaded plugins and load errors"),
    Command("hooks", "hooks:setup", "show the hook tree of a model, with shapes from a dry run"),
    Command(
        "run", "run:setup", "run a prompt through run_with_cache and show (or save) the activations"
    ),
    Command("spec", "spec:setup", "show or validate adapter specs"),
    Command("verify", "verify:setup", "check every hook point of a model (exit 1 on a failure)"),
    Command(
        "harvest",
        "harvest:setup",
        "harvest activations over a dataset into sharded safetensors (torchrun-ready)",
    ),
    Command(
        "attention-map",
        "attention:setup",
        "paint how much a token attends to each patch of the image, over the image (PNG)",
    ),
)


class UsageError(Exception):
    """The command line names something that does not exist or cannot be read (exit 2)."""


class CommandFailed(Exception):
    """The command ran but its work failed (exit 1)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with `argv` (default ``sys.argv[1:]``) and return the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(only=_commands_in(argv)).parse_args(argv)
    except SystemExit as exc:  # argparse exits for --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    except Exception as exc:  # a subcommand's module failed to import
        return _fail(exc, 1, "--debug" in argv, unexpected=True)
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


def build_parser(only: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``transformer-bridge`` and its subcommands.

    Args:
        only: set up only these subcommands' arguments (importing only their modules); the
            others are listed with their help. None sets up every subcommand.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="TransformerLens-style hook points on unchanged HuggingFace models.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage error. Docs: docs/cli.md",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--plain", action="store_true", help="plain-text output (no rich)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in COMMANDS:
        sub = add_command(commands, entry.name, entry.help)
        if only is None or entry.name in only:
            module, function = entry.setup.split(":")
            getattr(importlib.import_module(f"bridge_core.cli.{module}"), function)(sub)
    return parser


def add_command(commands: Any, name: str, help: str) -> argparse.ArgumentParser:
    """Add the subcommand `name` to `commands` (what ``add_subparsers`` returned), with the
    options every subcommand takes (``--debug``, ``--plain``)."""
    sub: argparse.ArgumentParser = commands.add_parser(
        name, parents=[_common()], help=help, description=help[0].upper() + help[1:] + "."
    )
    return sub


def _common() -> argparse.ArgumentParser:
    """``--debug``/``--plain`` after the subcommand (SUPPRESS keeps a subcommand's default from
    overwriting a value given before it)."""
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
    return common


def _commands_in(argv: Sequence[str]) -> list[str]:
    """The subcommand named in `argv` (none for ``--help`` or ``--version``): its first word
    that is not an option, since no top-level option takes a value."""
    return [arg for arg in argv if not arg.startswith("-")][:1]


def _version() -> str:
    from bridge_core import __version__

    return __version__
