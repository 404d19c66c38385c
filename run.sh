#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs everything, then
#   ./run.sh demo   renders a video with the small Open-Sora 1.2 trained here (CPU when there is no GPU)
#   ./run.sh test   runs the test suite (what CI runs)
#   ./run.sh serve  starts the HTTP service locally (local Ray, local output folder)
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    if [ ! -f "$STAMP" ]; then
        # torch is pinned to 2.13.0 in pyproject.toml: the installer takes the CPU wheel from $PIP_FIND_LINKS
        # when there is one; an unpinned torch would pull a multi-GB CUDA build.
        install_with_uv || install_with_pip
        "$VENV/bin/python" -c "import torch, ray, av, diffusers, transformers, triton, matplotlib" \
            || { echo "run.sh: installing dependencies failed (see the installer's output above)" >&2; exit 1; }
        touch "$STAMP"
    fi
    export PATH="$PWD/$VENV/bin:$PATH"
    export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
    export RAY_TMPDIR=${RAY_TMPDIR:-/tmp/pab-ray-$(id -u)}
    mkdir -p "$RAY_TMPDIR" outputs
}

install_with_uv() {
    # uv installs the dependencies in ~50 s where pip takes ~2 min 15 s, most of CI's set-up. It does not read pip's
    # configuration, so the sources pip is configured with (find-links, index URLs, constraints) are passed on,
    # and like pip it takes the best version from any of them. Any failure falls back to pip. It compiles the
    # bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set, every Ray worker and spawned rank would
    # otherwise compile torch's sources again on import (a CI run took half as long again).
    "$VENV/bin/pip" install --quiet uv >/dev/null 2>&1 || return 1
    local args=() line key val v
    while IFS= read -r line; do
        key=${line%%=*}
        val=${line#*=}
        val=${val#\'}
        val=${val%\'}
        for v in $val; do
            case "${key##*.}" in
                find-links) args+=(--find-links "$v") ;;
                index-url) args+=(--index-url "$v") ;;
                extra-index-url) args+=(--extra-index-url "$v") ;;
                constraint) [ -f "$v" ] && args+=(--constraint "$v") ;;
            esac
        done
    done < <("$VENV/bin/pip" config list 2>/dev/null)
    "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --index-strategy unsafe-best-match --compile-bytecode \
        "${args[@]}" -e ".[test]" || { echo "run.sh: uv could not install; trying pip" >&2; return 1; }
}

install_with_pip() {
    "$VENV/bin/pip" install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
    "$VENV/bin/pip" install --quiet -e ".[test]" 2>&1 | grep -v "is ignored" || true
}

browser() {
    # The playground test drives a real headless browser: Debian's chromium and chromium-driver.
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        return
    fi
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    if command -v apt-get >/dev/null; then
        $sudo apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
            || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
            || echo "run.sh: could not install chromium with apt-get; the playground test will be skipped" >&2
    fi
}

cmd=${1:-demo}
shift || true
case "$cmd" in
    demo)
        setup
        # A held-out prompt (training never saw this combination, pab/data/shapes.py) and a seed the shipped
        # weights render right; bench.quality measures them over all 64 held-out prompts.
        exec pab generate --model opensora-v1.2-small \
            --prompt "a magenta circle moving up quickly on a white background" --seed 11 \
            --pab paper --output outputs/demo.mp4 --strip outputs/demo.png "$@"
        ;;
    test)
        setup
        browser
        ruff check .
        # Triton's CPU interpreter runs the kernel tests without a GPU (set before anything imports triton).
        # Two pytest-xdist workers, the tests that start Ray first, in two blocks (tests/conftest.py). One torch
        # thread each: two workers with a thread per core each would oversubscribe the cores. CI keeps only part of
        # the output: short tracebacks, and the summary at the end names every failure and error (-rfEs).
        OMP_NUM_THREADS=1 TRITON_INTERPRET=1 exec python -m pytest -q -m "not gpu" -n 2 -rfEs --tb=short --durations=25 "$@"
        ;;
    serve)
        setup
        exec pab serve "$@"
        ;;
    *)
        echo "usage: ./run.sh [demo|test|serve] [args...]" >&2
        exit 2
        ;;
esac
