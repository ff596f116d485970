"""Every example runs and checks its own answer (figure 4.2 with 8 worker processes)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_all_examples() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "run_all.py"), "--workers", "8"],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all examples OK" in proc.stdout
    assert "reduce result is:  28 from 7 lambdas" in proc.stdout
