#!/usr/bin/env bash
# Runs the quick-start demo (test_frame/quick_start/demo.py) in the project virtualenv; extra
# arguments go to the demo. The virtualenv is chosen and set up exactly as scripts/test.sh does.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${FUNBOOST_LIKE_VENV:-}" ]]; then
    venv="$FUNBOOST_LIKE_VENV"
    if [[ ! -x "$venv/bin/python" ]]; then
        echo "scripts/demo.sh: FUNBOOST_LIKE_VENV=$venv is not a virtualenv" >&2
        exit 2
    fi
else
    venv=.venv
    marker="$venv/.funboost_like-installed"
    if [[ ! -x "$venv/bin/python" || ! -f "$marker" || pyproject.toml -nt "$marker" ]]; then
        echo "scripts/demo.sh: installing funboost_like[dev] into $venv" >&2
        [[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
        "$venv/bin/python" -m pip install -q -e '.[dev]'
        touch "$marker"
    fi
fi

exec "$venv/bin/python" test_frame/quick_start/demo.py "$@"
