"""scripts/gpu_smoke.py: the CUDA check where torch sees a GPU, and a CPU-vs-CPU run that checks the script itself."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_smoke.py"


def run_smoke(*args: str, timeout: float) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    summary = completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else ""
    print(completed.stdout[-3000:])
    assert completed.returncode == 0, (
        f"gpu_smoke exited {completed.returncode}\n--- stdout\n{completed.stdout[-4000:]}\n"
        f"--- stderr\n{completed.stderr[-6000:]}"
    )
    assert summary.startswith("gpu_smoke PASS"), summary
    return completed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=f"torch {torch.__version__} sees no CUDA device")
def test_qig_gptq_and_awq_on_cuda_match_the_cpu_run():
    run_smoke("--device", "cuda", timeout=600)


def test_the_smoke_script_runs_cpu_against_cpu_bit_identically():
    completed = run_smoke("--device", "cpu", "--samples", "1", timeout=600)
    assert "[qig_gptq]" in completed.stdout and "[qig_awq]" in completed.stdout
    assert "cpu vs cpu (exact)" in completed.stdout
