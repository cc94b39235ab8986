"""The README's demo runs and reports every result correct."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import REPO, subprocess_env


def test_quick_start_demo_runs(isolated_settings: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "test_frame" / "quick_start" / "demo.py")],
                          env=subprocess_env(isolated_settings), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "published 5000 calls" in proc.stdout
    assert "consumed 5000/5000" in proc.stdout
    assert "every result correct: True" in proc.stdout
