"""The machine a measurement was made on, as recorded in ``lowbit.json`` (quantize) and by ``lowbit bench``."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine(device: str | torch.device | None = None) -> dict:
    """``{"cpu", "cpu_count", "threads", "device", "torch", "python", "platform"}``; ``device`` (where the
    work ran) gets the GPU's name when it is a CUDA device."""
    dev = torch.device(device or "cpu")
    name = dev.type
    if dev.type == "cuda" and torch.cuda.is_available():
        name = f"cuda ({torch.cuda.get_device_name(dev)})"
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": name,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
