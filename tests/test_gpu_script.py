"""benchmarks/gpu.py without a GPU: one line and exit 2, nothing run (its --cpu-smoke mode is run by hand: ~1 min)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO


def test_gpu_script_without_cuda_says_so_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run")
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py")], capture_output=True, text=True,
                       cwd=REPO, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-smoke" in lines[0]
    assert p.stdout == ""
