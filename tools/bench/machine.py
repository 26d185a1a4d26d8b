"""Describe the machine a benchmark ran on, for the JSON every benchmark writes."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

__all__ = ["describe"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict:
    """CPU model and cores, Python and library versions, and the GPUs where there are any."""
    info = {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for module in ("torch", "torchvision", "PIL", "simplejpeg", "webdataset", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            pass
    # Read from the installed distribution, so describing the machine loads no DALI
    # (DALI is imported only by moco_dali.pipeline).
    for dist in ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110"):
        try:
            info["dali"] = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda"] = torch.version.cuda
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            )
            info["driver"] = (
                driver.stdout.strip().splitlines()[0] if driver.returncode == 0 else None
            )
        else:
            info["gpus"] = []
    except ImportError:
        pass
    return info
