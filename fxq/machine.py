"""The name of the machine measurements are taken on: its CPU model and CPU count (latency tables and benchmark
results record it, so that numbers from another machine are recognised)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_name() -> str:
    """``"<CPU model name>, <n> CPUs"`` (from /proc/cpuinfo where it exists)."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} CPUs"
