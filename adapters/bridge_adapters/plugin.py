"""Registers the built-in adapter specs through the same hook as any plugin."""

from __future__ import annotations

from collections.abc import Iterable

from bridge_adapters import spec_paths
from bridge_core.hookspecs import hookimpl
from bridge_core.spec import AdapterSpec


@hookimpl
def register_adapters() -> Iterable[AdapterSpec]:
    """Every ``specs/*.toml`` of this package: adding an architecture is adding a file."""
    return [AdapterSpec.from_file(path) for path in spec_paths()]
