"""Calls of the bridge from inside ``torch.compile``: the HF model runs outside the graph.

Python hooks that store, edit and route tensors are not something a compiled graph keeps, and
a graph compiled without hooks would silently skip hooks attached later. So when
``torch.compile(bridge)`` traces the bridge, the model's call is excluded from compilation
(`torch.compiler.disable`) and runs eagerly, with a warning. The excluded function is made on
first use: ``torch.compiler.disable`` imports torch._dynamo, about a second, and only a process
that compiles needs it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch


def run_outside_compile(run_model: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """``run_model(*args, **kwargs)``, eagerly, from inside a compiled call."""
    return _outside_compile()(run_model, args, kwargs)


def _run_eagerly(run_model: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    warnings.warn(
        "torch.compile(bridge) runs the HF model eagerly (hooks cannot live in a compiled "
        "graph); bridge.compile() compiles the model for calls without hooks",
        RuntimeWarning,
        stacklevel=2,
    )
    return run_model(*args, **kwargs)


@functools.cache
def _outside_compile() -> Callable[..., Any]:
    disable: Callable[..., Any] = torch.compiler.disable  # untyped in torch
    run: Callable[..., Any] = disable(_run_eagerly)
    return run
