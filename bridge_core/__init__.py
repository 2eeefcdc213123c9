"""transformer-bridge: TransformerLens-style hook points on unchanged HF models."""

from bridge_core.bridge import TransformerBridge
from bridge_core.cache import ActivationCache
from bridge_core.components.base import GeneralizedComponent
from bridge_core.config import TransformerBridgeConfig
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
from bridge_core.registry import get_registry
from bridge_core.spec import AdapterSpec, ComponentSpec

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
