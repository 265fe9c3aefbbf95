"""The machine a benchmark ran on, named in its header, so that figures from different machines are
never compared as if they were one (ratios between engines differ between CPUs too)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def machine() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), its cores, and the GPU torch sees
    if torch is already imported."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    torch = sys.modules.get("torch")
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch is not None and torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}"
