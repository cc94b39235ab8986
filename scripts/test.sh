#!/usr/bin/env bash
# The project's test command: runs pytest in the project virtualenv; extra arguments go to pytest.
#
#   bash scripts/test.sh                    # the whole suite
#   bash scripts/test.sh -k redis -x        # any pytest arguments
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

exec "$venv/bin/python" -m pytest "$@"
