#!/usr/bin/env bash
# Build the packages a GPU-machine run carries (the device image has torch, transformers, einops and
# safetensors, but no diffusers, Ray or PyAV, and one call may carry 64 MiB with the repo included):
#   .gpu-site/diffusers.tar.xz   diffusers without its pipeline subpackages (~1.3 MB; we use its VAE,
#                                schedulers and, for the peer benchmark, its Latte and PAB hook)
#   .gpu-site/site.tar.xz        with --serve: Ray Serve, FastAPI, pydantic, boto3, PyAV
#                                (../shared/tools/gpu-site, ~57 MB: carry it with diffusers.tar.xz only)
#   .gpu-av/av.tar.xz            with --av: PyAV alone (~24 MB), for the Ray + PyAV tests (see below)
#   .gpu-site/pydantic.tar.xz    with --pydantic: pydantic and its needs (~2.6 MB; pab.request validates with it),
#                                for runs without the site bundle: diffusers + pydantic + .gpu-av (~28 MB) fit beside
#                                the tree, so the one-GPU suite, PyAV's tests and bench.mp4/vae run in one call.
#                                Name the GPU test files (tests/gpu tests/kernels tests/models/test_latte.py
#                                tests/parallel/test_dsp_gpu.py tests/test_compile.py tests/test_video.py): pytest
#                                imports every file it collects, and the others import Ray or FastAPI.
#   .gpu-site/xdist.tar.xz       with --xdist: pytest-xdist and execnet (~0.1 MB), so `gpu_run.sh suite` runs its test
#                                files in 4 processes: most of the suite's time is Triton compiling, on the CPU.
# In the run: mkdir -p /tmp/site && for f in .gpu-site/*.tar.xz; do tar -xJf $f -C /tmp/site; done &&
#             export PYTHONPATH=$PWD:/tmp/site RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
#
# Ray and PyAV together (test_serve_gpu, test_bulk_gpu and test_worker's GPU test, which need 2 GPUs and skip on
# one): the tracked tree (~30 MB, shipped weights included) and the 57 MB bundle exceed one call's 64 MiB. Build
# `--serve-no-av --av` and carry them in two calls on the same warm machine (it is given back ~30 s after a call
# ends, so issue them back to back): the first carries .gpu-site and unpacks it into /tmp/site, the second carries
# .gpu-av, unpacks it into the same /tmp/site (kept between calls) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.gpu-site/" .git/info/exclude 2>/dev/null || echo "/.gpu-site/" >> .git/info/exclude
mkdir -p .gpu-site
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps -d "$work" "diffusers==$(.venv/bin/python -c 'import diffusers; print(diffusers.__version__)')"
(cd "$work" && python3 -m zipfile -e diffusers-*.whl site && rm -rf site/diffusers/pipelines/*/)
tar -cf - -C "$work/site" . | xz -9 -T2 > .gpu-site/diffusers.tar.xz
ls -l .gpu-site/diffusers.tar.xz
for arg in "$@"; do
    case "$arg" in
        --serve) ../shared/tools/gpu-site ;;
        --pydantic)
            pv=$(.venv/bin/python -c 'import pydantic, pydantic_core; print(pydantic.__version__, pydantic_core.__version__)')
            python3 -m pip download -q --no-deps -d "$work/pyd" --python-version 3.12 --implementation cp \
                --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
                "pydantic==${pv% *}" "pydantic-core==${pv#* }" annotated-types typing-inspection
            (cd "$work/pyd" && for w in *.whl; do python3 -m zipfile -e "$w" site; done)
            tar -cf - -C "$work/pyd/site" . | xz -9 -T2 > .gpu-site/pydantic.tar.xz
            ls -l .gpu-site/pydantic.tar.xz ;;
        --xdist)
            xv=$(.venv/bin/python -c 'import xdist, execnet; print(xdist.__version__, execnet.__version__)')
            python3 -m pip download -q --no-deps -d "$work/xd" "pytest-xdist==${xv% *}" "execnet==${xv#* }"
            (cd "$work/xd" && for w in *.whl; do python3 -m zipfile -e "$w" site; done)
            tar -cf - -C "$work/xd/site" . | xz -9 -T2 > .gpu-site/xdist.tar.xz
            ls -l .gpu-site/xdist.tar.xz ;;
        --serve-no-av) ../shared/tools/gpu-site --no-av ;;
        --av)
            grep -qx "/.gpu-av/" .git/info/exclude || echo "/.gpu-av/" >> .git/info/exclude
            python3 -m pip download -q --no-deps -d "$work/av" --python-version 3.12 --implementation cp \
                --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 av
            (cd "$work/av" && python3 -m zipfile -e av-*.whl site)
            mkdir -p .gpu-av
            tar -cf - -C "$work/av/site" . | xz -9 -T2 > .gpu-av/av.tar.xz
            ls -l .gpu-av/av.tar.xz ;;
        *) echo "unknown option $arg (known: --serve, --serve-no-av, --av, --pydantic, --xdist)" >&2; exit 2 ;;
    esac
done
