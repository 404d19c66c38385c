#!/usr/bin/env bash
# Build the packages a GPU-machine run carries (the device image has torch, transformers, einops and
# safetensors, but no diffusers, Ray or PyAV, and one call may carry 64 MiB with the repo included):
#   .gpu-site/diffusers.tar.xz   diffusers without its pipeline subpackages (~1.3 MB; we use its VAE,
#                                schedulers and, for the peer benchmark, its Latte and PAB hook)
#   .gpu-site/site.tar.xz        with --serve: Ray Serve, FastAPI, pydantic, boto3, PyAV
#                                (../shared/tools/gpu-site, ~57 MB: carry it with diffusers.tar.xz only)
# In the run: mkdir -p /tmp/site && for f in .gpu-site/*.tar.xz; do tar -xJf $f -C /tmp/site; done &&
#             export PYTHONPATH=$PWD:/tmp/site RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
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
if [ "${1:-}" = "--serve" ]; then
    ../shared/tools/gpu-site
fi
