"""What the benchmark scripts share: where results go, a description of the machine, child processes."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine_facts() -> str:
    """Cores, CPU model, RAM, kernel, glibc, THP mode and the library versions that matter for the numbers."""
    import numpy
    import psutil
    import torch
    import transformers
    import zmq

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "unknown"
    return (f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Linux "
            f"{platform.release()}, glibc {platform.libc_ver()[1]}, THP `{thp}`; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {numpy.__version__}, "
            f"pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}")


def spawn(script: str | Path, args: list[str], env_extra: dict[str, str] | None = None,
          env_drop: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start ``python script args...`` as a child (stdout piped, text) with this checkout on its path."""
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
