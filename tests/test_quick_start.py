"""The README's demo runs and reports every result correct."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import REPO, subprocess_env


def test_quick_start_demo_runs(isolated_settings: Path) -> None:
    """Without a ResourceWarning either: on Python 3.13 the demo reported the SQLite connections of its
    ended threads as unclosed (CI's smoke test runs this file on 3.13)."""
    proc = subprocess.run([sys.executable, "-W", "error::ResourceWarning",
                           str(REPO / "test_frame" / "quick_start" / "demo.py")],
                          env=subprocess_env(isolated_settings), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ResourceWarning" not in proc.stderr, proc.stderr
    assert "published 5000 calls" in proc.stdout
    assert "consumed 5000/5000" in proc.stdout
    assert "every result correct: True" in proc.stdout
