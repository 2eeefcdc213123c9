"""The ``transformer-bridge`` command line: ``main(argv) -> exit code``.

``app`` parses and dispatches (and lists the subcommands, one module each); ``model`` holds
what the model commands share; ``render`` prints tables and trees, with or without rich.
"""

from bridge_core.cli.app import main

__all__ = ["main"]
