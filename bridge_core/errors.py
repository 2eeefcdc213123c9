"""One exception hierarchy, so users can catch ours specifically."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BridgeError(Exception):
    """Base class of every error raised by transformer-bridge."""


class AdapterNotFoundError(BridgeError, KeyError):
    """No adapter claims an architecture, or no adapter has the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateAdapterError(BridgeError):
    """Two adapters claim one architecture at the same priority."""


class SpecError(BridgeError, ValueError):
    """An adapter spec is malformed or does not fit the model it is applied to."""


class PluginLoadError(BridgeError):
    """A plugin failed to import, or returned something invalid from a hook."""


class HookNameError(BridgeError, KeyError):
    """A hook name that the bridge does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class HookReturnError(BridgeError, ValueError):
    """A hook function returned something that cannot replace the activation."""


class BootError(BridgeError, OSError):
    """A model could not be found or loaded by `TransformerBridge.boot`."""


class InputError(BridgeError, ValueError):
    """Inputs to a bridge call that the model cannot take."""


class MissingExtraError(BridgeError, ImportError):
    """An optional dependency (an extra such as ``multimodal``) that a feature needs is missing."""


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ' Did you mean ...?' for close matches of `name`, or an empty string."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"
