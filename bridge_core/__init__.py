"""transformer-bridge: TransformerLens-style hook points on unchanged HF models."""

import importlib
from typing import TYPE_CHECKING, Any

from bridge_core.bridge import TransformerBridge
from bridge_core.cache import ActivationCache
from bridge_core.components.base import GeneralizedComponent
from bridge_core.errors import (
    AdapterNotFoundError,
    BootError,
    BridgeError,
    DuplicateAdapterError,
    HookNameError,
    HookReturnError,
    InputError,
    PluginLoadError,
    SpecError,
)
from bridge_core.hooks import HookPoint
from bridge_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from bridge_core.config import TransformerBridgeConfig
    from bridge_core.registry import get_registry
    from bridge_core.spec import AdapterSpec, ComponentSpec

# These need pydantic (~0.1 s to import): loaded on first access, or by the first wrap/boot.
_LAZY = {
    "AdapterSpec": "bridge_core.spec",
    "ComponentSpec": "bridge_core.spec",
    "TransformerBridgeConfig": "bridge_core.config",
    "get_registry": "bridge_core.registry",
}


def __getattr__(name: str) -> Any:
    """Import the pydantic-backed names of the public API on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'bridge_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "ActivationCache",
    "AdapterNotFoundError",
    "AdapterSpec",
    "BootError",
    "BridgeError",
    "ComponentSpec",
    "DuplicateAdapterError",
    "GeneralizedComponent",
    "HookNameError",
    "HookPoint",
    "HookReturnError",
    "InputError",
    "PluginLoadError",
    "SpecError",
    "TransformerBridge",
    "TransformerBridgeConfig",
    "get_registry",
    "hookimpl",
]
