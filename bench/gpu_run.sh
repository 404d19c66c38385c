#!/usr/bin/env bash
# One device call's worth of GPU work, by name. Run from the repository root on the device machine, carrying
# .gpu-site and .gpu-av (bench/gpu_bundle.sh --pydantic --av builds them; ~28 MB beside the tree):
#
#   bash bench/gpu_run.sh suite   the one-GPU test suite: tests/gpu, tests/kernels, the VAE kernels, -m gpu (~6 min in
#                                 one process on an H100; carry .gpu-site/xdist.tar.xz for 4)
#   bash bench/gpu_run.sh e2e     Open-Sora 480p fp8 off/paper end to end with the kernel profile, bench.mp4 on the
#                                 host's cores, Latte fp8 off/paper (~6 min on an H100)
#   bash bench/gpu_run.sh plan    Open-Sora-Plan v1.1 fp8 off/paper, DiT only, with the profile (~4-5 min; issue #20's
#                                 third target)
#   bash bench/gpu_run.sh graphs  Latte fp8 `paper`, DiT only, with the profile's idle share: eager, then CUDA graphs
#                                 (~2.5 min)
#   bash bench/gpu_run.sh targets issue #20's record with `plan` after it in a second call: Open-Sora 480p fp8 off/paper
#                                 end to end and Latte (and diffusers' Latte with its PAB, the 2x target's baseline on
#                                 the same card), each with its profile, the idle share the median of three profiled
#                                 generations (~7 min on an H100; with Open-Sora-Plan too it ran 590 s, session 31)
#   bash bench/gpu_run.sh decode  Open-Sora 480p fp8 off/paper end to end, the GPU's idle share and kernels inside the
#                                 decode to mp4 (the median of three profiled generations; ~2 min)
#   bash bench/gpu_run.sh short   the temporal kernel's launch shapes at 15, 16, 17, 20 and 30 frames (bench.short; ~2 min)
#   bash bench/gpu_run.sh cross   the flash kernel's launch configs at Open-Sora 480p's cross-attention, 30 and 120
#                                 text tokens, against cuDNN (~5-8 min; picks `cross_config`)
#   bash bench/gpu_run.sh ab      the working tree against another revision on the same card: Open-Sora 480p and
#                                 Latte fp8 off, DiT only, the two trees alternating, two rounds (~6 min; AB_CASES=latte
#                                 for one case). Here first:
#                                 rm -rf .ab-base && mkdir .ab-base && git archive REV pab ':!pab/weights' | tar -x -C .ab-base
#                                 then carry .ab-base too. The base runs with .ab-base as its working directory:
#                                 `python -m` puts the working directory ahead of PYTHONPATH, so a PYTHONPATH entry
#                                 alone would run the working tree's pab twice.
#
# Records land in $OUT (the device's return folder): append them to bench/results/<gpu>.json here with
# bench.records, noting the session. Each step has its own timeout so one call stays under the 600 s limit.
set -uo pipefail
what="${1:?usage: bash bench/gpu_run.sh suite|e2e|decode|plan|targets|ab|graphs|short|cross}"
OUT="${OUT:?set OUT to the folder the records go to}"
mkdir -p /tmp/site
for f in .gpu-site/*.tar.xz .gpu-av/*.tar.xz; do [ -f "$f" ] && tar -xJf "$f" -C /tmp/site; done
export PYTHONPATH="$PWD:/tmp/site" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONDONTWRITEBYTECODE=1
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
export PAB_BENCH_MACHINE="one $gpu"
t0=$(date +%s)
# Each step's timeout is "until N s into a 600 s call"; GPU_RUN_LIMIT=S runs this inside S seconds instead (what is left
# of the call after an earlier command of it): bash bench/gpu_run.sh short; GPU_RUN_LIMIT=480 bash bench/gpu_run.sh suite
shift_s=$(( 600 - ${GPU_RUN_LIMIT:-600} ))
left() { echo $(( $1 - shift_s - ($(date +%s) - t0) )); }
step() { echo "== $1 at $(( $(date +%s) - t0 )) s on $gpu"; }

case "$what" in
    suite)
        # Most of the time is Triton compiling each kernel's variants, on the CPU: with pytest-xdist carried
        # (gpu_bundle.sh --xdist) the files run in $SUITE_WORKERS processes sharing the GPU.
        par=""; python -c "import xdist" 2>/dev/null && par="-n ${SUITE_WORKERS:-4} --dist loadfile"
        step "GPU tests ${par:-(one process: no xdist carried)}"
        timeout "$(left 520)" python -m pytest -q -p no:cacheprovider $par tests/gpu tests/kernels \
            tests/test_vae_kernels.py tests/bench/test_vae.py 2>&1 | grep -v Warn | tail -8
        step "-m gpu tests"
        timeout "$(left 590)" python -m pytest -q -p no:cacheprovider -m gpu tests/models/test_latte.py tests/test_compile.py \
            tests/test_video.py tests/parallel/test_dsp_gpu.py tests/bench/test_cublaslt.py 2>&1 | grep -v Warn | tail -6 ;;
    e2e)
        step "bench.mp4"
        timeout 70 python -m bench.mp4 --decode-s 0.5 --out "$OUT/mp4.json" 2>&1 | tail -32
        step "Open-Sora 480p"
        timeout "$(left 360)" python -m bench.run --cases opensora-480p --precision fp8 --pab off,paper --idle \
            --out "$OUT/run.json" 2>&1 | grep -v Warn | tail -45
        step "Latte"
        timeout "$(left 570)" python -m bench.run --cases latte --precision fp8 --pab off,paper --idle \
            --out "$OUT/run.json" 2>&1 | grep -v Warn | tail -45 ;;
    decode)
        step "Open-Sora 480p, the decode profiled"
        timeout "$(left 590)" python -m bench.run --cases opensora-480p --precision fp8 --pab off,paper --decode-idle 3 \
            --out "$OUT/run.json" 2>&1 | grep -v Warn | tail -45 ;;
    plan)
        # PLAN_PRECISION=fp8,fp8+crossbf16 times a mode beside the family's own in the same process; PLAN_ARGS adds
        # bench.run options (PLAN_ARGS="--idle 3 --cuda-graphs": its `paper` idle with the step in graphs).
        step "Open-Sora-Plan"
        timeout "$(left 570)" python -m bench.run --cases opensora-plan --precision "${PLAN_PRECISION:-fp8}" --pab off,paper \
            --idle --dit-only ${PLAN_ARGS:-} --out "$OUT/run.json" 2>&1 | grep -v Warn | tail -45 ;;
    targets)
        step "Open-Sora 480p"
        timeout "$(left 260)" python -m bench.run --cases opensora-480p --precision fp8 --pab off,paper --idle 3 \
            --out "$OUT/run.json" 2>&1 | grep -v Warn | grep " | \|fp8:\|idle\|wrote\|rror"
        step "Latte"
        timeout "$(left 590)" python -m bench.run --cases latte --precision fp8 --pab off,paper --idle 3 --dit-only \
            --peer --peer-caches paper --out "$OUT/run.json" 2>&1 | grep -v Warn | grep " | \|fp8:\|idle\|wrote\|rror" ;;
    ab)
        [ -f .ab-base/pab/__init__.py ] || { echo "no .ab-base/pab: see the header" >&2; exit 2; }
        for round in 1 2; do
            order="new base"; [ "$round" = 2 ] && order="base new"
            for case in ${AB_CASES:-opensora-480p latte}; do
                for who in $order; do
                    [ "$(left 560)" -lt 50 ] && { step "out of time"; break 3; }
                    dir="$PWD"; [ "$who" = base ] && dir="$PWD/.ab-base"
                    step "$who $case, round $round"
                    (cd "$dir" && PYTHONPATH="$dir:$PYTHONPATH" timeout "$(left 570)" python -m bench.run --cases "$case" \
                        --precision fp8 --pab off --dit-only --out "$OUT/run-$who.json" 2>&1 | grep -v Warn | tail -2)
                done
            done
        done ;;
    graphs)
        for g in "" --cuda-graphs; do
            step "Latte paper fp8 ${g:-eager}"
            timeout "$(left 290)" python -m bench.run --cases latte --precision fp8 --pab paper --idle --dit-only $g \
                --out "$OUT/run-graphs.json" 2>&1 | grep -v Warn | tail -14
        done ;;
    short)
        # the temporal kernel's launch shapes at each DiT's frame count (~2 min: Triton compiles each shape)
        step "short-sequence attention"
        timeout "$(left 200)" python -m bench.short --out "$OUT/short.json" 2>&1 | grep -v Warn | tail -70 ;;
    cross)
        # `cross_config` (pab/kernels/flash_attention.py) is a guess: sweep the pointer kernel at Open-Sora 480p's
        # cross-attention (2 x 16 heads x 23,850 video tokens, d = 72) against a short and a long prompt's tokens
        for keys in 30 120; do
            step "cross-attention, $keys keys"
            timeout "$(left $((keys == 30 ? 280 : 570)))" python -m bench.attention_triton --sweep --layout packed \
                --seqs 2 --tokens 23850 --keys "$keys" --iters 10 --out "$OUT/attention-cross.json" 2>&1 \
                | grep -v Warn | tail -12
        done ;;
    *) echo "unknown call $what; one of suite, e2e, plan, targets, ab, graphs, short, cross" >&2; exit 2 ;;
esac
step "done"
