"""Every example runs and checks its own answer (figure 4.2 with 8 worker processes; the cirrus
workflow of figure 3.5: load, normalize, train, tune)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_all_examples() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "run_all.py"), "--workers", "8"],
                          capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all examples OK" in proc.stdout
    assert "reduce result is:  28 from 7 lambdas" in proc.stdout
    # the cirrus workflow: trained to a held-out loss better than chance, and a grid search table
    trained = next(line for line in proc.stdout.splitlines() if line.startswith("(b) trained"))
    assert float(trained.split("log loss ")[1].split(",")[0]) < 0.69, trained
    assert "(c) grid search:" in proc.stdout and "learning_rate  minibatch_size" in proc.stdout
