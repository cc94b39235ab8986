#!/usr/bin/env bash
# The project's test command: runs pytest in the project virtualenv; extra arguments go to pytest.
#
#   bash scripts/test.sh                    # the whole suite, in FUNBOOST_LIKE_TEST_WORKERS (3) workers
#   bash scripts/test.sh -k redis -x        # any pytest arguments (one process unless -n is given)
#
# The whole suite runs in pytest-xdist workers: most tests wait on servers, sockets and consumer
# processes, so three workers on two cores finish in about half the time of one. Tests of one
# private server share an ``xdist_group``; cleanup of the shared servers runs once, at the end. Tests
# marked ``serial`` run after the parallel run, in one process. pytest-xdist 3.8 ignores
# ``xdist_group`` under pytest 9.2 (pytest-dev/pytest-xdist#1386), so pyproject.toml keeps pytest
# below 9.2; and a group only keeps tests apart within one session, so tests that must not overlap
# with another session on the same servers hold a lock instead (``exclusive`` in tests/conftest.py).
#
# A test that fails runs once more (pytest-rerunfailures) and the summary lists it under "RERUN":
# these tests drive real servers and processes on a loaded two-core machine, and one timing-sensitive
# failure should not hide the rest of a run. A test that fails twice fails the run. A rerun is a
# defect to find, not a pass: read the RERUN lines.
#
# The virtualenv is .venv, created and installed with the [dev] extra when missing or older than
# pyproject.toml. When FUNBOOST_LIKE_VENV names another virtualenv (as .ci/run does), that one is
# used as it is: its creator installed it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${FUNBOOST_LIKE_VENV:-}" ]]; then
    venv="$FUNBOOST_LIKE_VENV"
    if [[ ! -x "$venv/bin/python" ]]; then
        echo "scripts/test.sh: FUNBOOST_LIKE_VENV=$venv is not a virtualenv" >&2
        exit 2
    fi
else
    venv=.venv
    marker="$venv/.funboost_like-installed"
    if [[ ! -x "$venv/bin/python" || ! -f "$marker" || pyproject.toml -nt "$marker" ]]; then
        echo "scripts/test.sh: installing funboost_like[dev] into $venv" >&2
        [[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
        "$venv/bin/python" -m pip install -q -e '.[dev]'
        touch "$marker"
    fi
fi

if [[ $# -eq 0 ]]; then  # the whole suite: in workers, then the few marked serial alone
    status=0
    rerun=(--reruns 1 --reruns-delay 1 -rfER)
    "$venv/bin/python" -m pytest -n "${FUNBOOST_LIKE_TEST_WORKERS:-3}" --dist loadgroup -m "not serial" "${rerun[@]}" \
        || status=$?
    "$venv/bin/python" -m pytest -m serial "${rerun[@]}" || status=$?
    exit "$status"
fi
exec "$venv/bin/python" -m pytest "$@"
