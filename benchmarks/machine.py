"""What the numbers were measured on: CPU, cores, versions, torch threads, load average."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch
import transformers


def machine() -> dict[str, Any]:
    """The machine and software of this process, with a one-line summary."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    malloc = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "os": f"{platform.system()} {platform.release()}",
        "load_average_start": os.getloadavg(),
        # glibc's allocator settings: whether freed memory is kept changes per-call times
        "malloc": malloc,
    }
    info["summary"] = (
        f"{info['cpu']}, {info['cores']} cores, {info['os']}; Python {info['python']}, "
        f"torch {info['torch']} ({info['torch_threads']} threads), transformers "
        f"{info['transformers']}"
    )
    if malloc:
        info["summary"] += "; " + " ".join(f"{k}={v}" for k, v in malloc.items())
    return info
