#!/usr/bin/env bash
# The two commands of a fresh machine. Each sets up .venv (once) and then runs:
#   ./jam.sh quickstart [args]   the main job on the embedded default (see README)
#   ./jam.sh test [pytest args]  the test suite (with CI=true also the slow tests)
# Other verbs: ./jam.sh setup (only install), ./jam.sh slow (also the slow tests), ./jam.sh <cli> args (any jam-* tool).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${JAM_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
    local stamp="$VENV/.jam-installed"
    local want
    want=$(cat setup.py | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    echo "[jam] setting up $VENV (first run: torch, fairseq build ~10 min)" >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools >&2
    # torch/torchvision first, pinned, so nothing later pulls another (multi-GB) build.
    "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 >&2
    "$VENV/bin/python" -m pip install -q -e ".[all]" >&2
    echo "$want" > "$stamp"
}

verb=${1:-help}
shift || true
case "$verb" in
    setup) setup ;;
    quickstart|demo|run) setup; exec "$VENV/bin/jam" "$verb" "$@" ;;
    test)
        setup
        # CI (CI=true) has time for the slow tests too (~8 min more); metaseq-only tests never run here.
        if [ "${CI:-}" = "true" ]; then set -- -m "not metaseq" "$@"; fi
        exec "$VENV/bin/python" -m pytest -q "$@" ;;
    slow) setup; exec "$VENV/bin/python" -m pytest -q -m "not metaseq" "$@" ;;
    jam-*) setup; exec "$VENV/bin/$verb" "$@" ;;
    help|-h|--help) sed -n '2,6p' "$0" ;;
    *) echo "jam.sh: unknown verb '$verb' (quickstart | test | slow | setup | jam-<tool>)" >&2; exit 2 ;;
esac
