"""Booster is generic over the function's ParamSpec: mypy rejects a wrong push."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

SNIPPET = '''\
from funboost_like import task_deco, BrokerEnum

@task_deco("typing_queue", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, qps=5)
def add(a: int, b: int = 0) -> int:
    return a + b

add.push(1, b=2)
add.push("one")
add.push(1, c=3)
result: str = add(1, 2)
task_deco("q", qsp=3)
'''


def test_mypy_checks_push_against_the_signature(tmp_path: Path) -> None:
    if shutil.which("mypy") is None and subprocess.run([sys.executable, "-m", "mypy", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mypy is not installed")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--hide-error-context", "--no-incremental",
         "--follow-imports=silent", str(snippet)],
        capture_output=True, text=True, cwd=REPO, env={"MYPYPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    lines = proc.stdout.splitlines()
    errors_by_line = {int(line.split(":")[1]) for line in lines if ": error:" in line}
    assert errors_by_line == {8, 9, 10, 11}, proc.stdout + proc.stderr
