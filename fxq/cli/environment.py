"""Where a run ran: its command, package versions, Python, platform and CPUs (a run folder's environment.json)."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import uuid
from importlib import metadata
from pathlib import Path

#: Distributions whose versions a run records (the numbers depend on them).
PACKAGES = ("fxq", "torch", "onnxruntime", "onnx", "numpy", "pycocotools", "matplotlib", "pyyaml")


def environment(command: str) -> dict:
    """The record of this process: a new run id, ``command`` (the fxq command that reproduces the run), the
    process's argv, the start time, package versions (None when not installed), Python, platform, CPU model and
    counts, torch threads."""
    import torch

    return {
        "run_id": uuid.uuid4().hex,
        "command": command,
        "argv": list(sys.argv),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what :func:`platform.processor` says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
