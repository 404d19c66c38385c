"""bench/run.py: counting FLOPs must not leave a "--compile" benchmark running eager code; the group path."""

import json
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from bench.run import (
    CASES, FP8_MODES, Case, _flops_by_kind, _run_case, fixed_schedule, precision_list, schedules_for, speedup,
    x264_options,
)  # fmt: skip
from pab.engine import EngineOptions
from pab.kernels import KernelOptions
from pab.parallel import launch_local
from pab.pipeline import GenerationRequest, Pipeline


def test_flop_count_keeps_the_pipeline_compiled():
    """A compiled function first called under FlopCounterMode is never compiled afterwards by Dynamo; the
    benchmark counts FLOPs in force_eager so the generations after it still run compiled code."""
    torch._dynamo.reset()
    counters.clear()
    pipe = Pipeline.from_name("opensora-v1.2-tiny", device="cpu", dtype=torch.float32,
                              engine=EngineOptions(compile=True))  # fmt: skip
    request = GenerationRequest(model="opensora-v1.2-tiny", prompt="a cat", steps=4, seed=0)
    flops, per_call = _flops_by_kind(pipe, request)
    eager = Pipeline.from_name("opensora-v1.2-tiny", device="cpu", dtype=torch.float32)
    assert flops == _flops_by_kind(eager, request)[0] > 0  # the compiled model's FLOPs are the eager ones
    assert set(per_call) == {"spatial", "temporal", "cross", "mlp"}
    assert counters["stats"]["unique_graphs"] == 0
    pipe.generate(request, decode=False)
    assert counters["stats"]["unique_graphs"] > 0, dict(counters["frames"])


def test_group_records_with_overlapped_switches():
    """One case on 2 gloo processes, DSP with the switches in 3 chunks and CUDA graphs' bookkeeping (the eager
    stand-in on CPU): the record says so and counts the same switches (once per switch) as unchunked without
    graphs. Equivalence of the results: tests/parallel/test_dsp_models.py."""
    case = Case("tiny", "opensora-v1.2-tiny", "tiny", 17, 64, 64, 3)
    plain = launch_local(2, _run_case, case, [("off", "off")], False, 1, EngineOptions(), False, 1,
                         backend="gloo")[0]
    chunked = launch_local(2, _run_case, case, [("off", "off")], False, 1,
                           EngineOptions(cuda_graphs=True), False, 3, backend="gloo")[0]
    assert [r["overlap_chunks"] for r in plain + chunked] == [1, 3]
    assert [r["cuda_graphs"] for r in plain + chunked] == [False, True] and chunked[0]["graphs"]["replays"] > 0
    assert plain[0]["sp"] == chunked[0]["sp"] == 2
    assert chunked[0]["comm"]["all_to_all_done"] == plain[0]["comm"]["all_to_all_done"] > 0
    # head parallelism would re-shard q, k, v and the output where DSP switches the activation twice
    comm = plain[0]["comm"]
    assert plain[0]["head_parallel_bytes_per_step"] * 3 == 2 * comm["all_to_all_bytes"] + comm["gather_bytes"]


def test_speedup_is_taken_against_the_one_gpu_record_of_the_same_case():
    def rec(gpus, pab, dit_s, model="m"):
        return {"impl": "pab", "model": model, "resolution": "r", "pab": pab, "compile": False, "gpus": gpus,
                "dit_s": dit_s}  # fmt: skip

    records = [rec(1, "off", 30.0), rec(1, "paper", 24.0), rec(2, "off", 16.0), rec(2, "paper", 12.0),
               rec(4, "off", 10.0, model="other")]  # fmt: skip
    assert speedup(records[2], records) == "1.88x"
    assert speedup(records[3], records) == "2.00x"
    assert speedup(records[0], records) is None  # the baseline itself
    assert speedup(records[4], records) is None  # no one-GPU record of that model in this run


def test_a_fixed_step_schedule_runs_at_any_step_count_and_counts_only_computed_flops():
    """bench.run --pab fixed-slow: the shipped calibration's schedule, at this case's 10 steps; the FLOPs are
    those of the steps that ran."""
    from pab.models import WEIGHTS_DIR

    name, spec = fixed_schedule("fixed-slow", str(WEIGHTS_DIR / "opensora-v1.2-small" / "cache.json"))
    assert name == "fixed-slow" and spec["policy"] == "fixed" and spec["reuse_of"] == 30 and spec["reuse"]
    case = Case("tiny", "opensora-v1.2-tiny", "tiny", 17, 64, 64, 10)
    off, fixed = _run_case(0, 1, case, [("off", "off"), (name, spec)], False, 1, EngineOptions(), False)
    reused = fixed["cache_stats"]["reused"]
    assert fixed["pab"] == "fixed-slow" and reused > 0 and off["cache_stats"] == {}
    assert fixed["tflop"] * 10 == pytest.approx(off["tflop"] * (10 - reused), rel=0.02, abs=0.1)


def test_each_case_runs_its_own_familys_calibrated_schedule():
    """Latte's 50 steps run latte-1-small's schedule (calibrated at 50), not Open-Sora's stretched from 30."""
    latte = json.loads(Path(schedules_for(CASES["latte"])).read_text())
    assert latte["model"] == "latte-1-small" and latte["steps"] == 50
    assert json.loads(Path(schedules_for(CASES["opensora-480p"])).read_text())["model"] == "opensora-v1.2-small"


def test_idle_share_is_the_part_of_the_loop_no_kernel_covers():
    from bench.run import idle_pct

    # Loop 0-100; kernels overlap (10-30, 20-40), leave 40-60 idle, run 60-90; one starts before the loop.
    assert idle_pct(0, 100, [(20, 40), (10, 30), (60, 90), (-5, 5)]) == round(100 * (1 - 65 / 90), 2)
    assert idle_pct(0, 100, [(200, 300)]) is None


def test_kernels_are_sorted_by_kind_from_their_names():
    from bench.run import kernel_kind

    names = {  # names as torch.profiler reports them on an H100/H200 (cuBLAS, cuDNN, ours, PyTorch's)
        "nvjet_sm90_tst_256x128_64x4_2x1_v_bz_coopA_TNT": "gemm",
        "sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128": "gemm fp8",
        "nvjet_sm90_qqtst_128x128_128x6_1x2_h_bz_ovscale_bias_TNT": "gemm fp8",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3": "attention",
        "_flash_fwd_kernel": "attention",
        "_ln_modulate_kernel": "norm / modulate / residual (Triton)",
        "_gated_residual_kernel": "norm / modulate / residual (Triton)",
        "_quantize_rows_kernel": "quantise / gelu (Triton)",
        "void at::native::elementwise_kernel<128, 2>": "elementwise",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<>": "copy / layout",
        "Memset (Device)": "other",
    }
    assert {name: kernel_kind(name) for name in names} == names


@pytest.mark.parametrize("cache", ["off", "paper", "fastercache"])
def test_the_peer_runs_diffusers_own_caches_on_its_latte(cache):
    from bench.run import run_peer_latte

    rec = run_peer_latte(cache, device="cpu", size="tiny", steps=6)
    assert rec["impl"] == "diffusers" and rec["pab"] == cache and rec["steps"] == 6 and rec["dit_s"] > 0



@pytest.mark.parametrize("cache", ["firstblockcache", "magcache"])
def test_the_peers_step_skipping_caches_fail_on_latte_and_the_bench_says_why(cache, tmp_path, monkeypatch):
    """diffusers 0.42's first-block and mag caches mix Latte's frames-major and tokens-major layouts (bench.run's
    note); the bench records the reason instead of a time. If diffusers fixes them, this fails: time them then."""
    import bench.run as run

    with pytest.raises(RuntimeError, match="must match the size"):
        run.run_peer_latte(cache, device="cpu", size="tiny", steps=4)
    monkeypatch.setattr(run, "_run_case", lambda *a, **k: [])
    monkeypatch.setattr(run, "run_peer_latte", lambda pab, repeat: (_ for _ in ()).throw(RuntimeError(f"{pab} no")))
    out = tmp_path / "r.json"
    assert run.main(["--cases", "latte", "--pab", "off", "--peer", "--peer-caches", cache, "--out", str(out)]) == 0
    [rec] = json.loads(out.read_text())
    assert rec["impl"] == "diffusers" and rec["pab"] == cache and rec["error"] == f"RuntimeError: {cache} no"


def test_x264_options_parse_and_a_bad_one_is_named():
    import argparse

    assert x264_options("preset=faster,rc-lookahead=8") == {"preset": "faster", "rc-lookahead": "8"}
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        x264_options("faster")


def test_precision_modes_parse_and_a_misspelt_one_is_named():
    import argparse

    assert precision_list("fp8,fp8+outbf16") == ("fp8", "fp8+outbf16")
    with pytest.raises(argparse.ArgumentTypeError, match="fp8\\+outbf16"):
        precision_list("fp8,fp8+outbf61")  # would have run the defaults, labelled as a mode
    with pytest.raises(argparse.ArgumentTypeError):
        precision_list("")


def test_end_to_end_includes_the_mp4_encoded_while_decoding():
    case = Case("tiny", "opensora-v1.2-tiny", "tiny", 17, 64, 64, 2)
    [rec] = _run_case(0, 1, case, [("off", "off")], False, 1, EngineOptions(), True,
                      kernels=KernelOptions(spatial_attention="triton"),  # on the CPU: SDPA, as `supported` says
                      x264=x264_options("preset=veryfast"))  # fmt: skip
    assert rec["spatial_attention"] == "triton"
    assert rec["x264"] == {"rc-lookahead": "8", "preset": "veryfast", "thread_type": "frame"}  # over Mp4Writer's defaults
    assert rec["mp4_s"] >= 0 and 0 < rec["e2e_s"] <= rec["to_mp4_s"]  # prompt to mp4 on disk, after the decode


def test_each_fp8_mode_sets_its_one_setting_over_the_familys_own_config(monkeypatch):
    """--precision fp8 runs the pipeline's own Fp8Config (its family's); each fp8+<mode> sets the one field it names
    over that, whatever mode ran before it in the same process."""
    import dataclasses

    import bench.run as run
    from pab.families import FAMILIES

    for family in FAMILIES.values():
        for mode, change in FP8_MODES.items():
            cfg = dataclasses.replace(family.fp8, **change)
            differs = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(family.fp8, f.name)}
            assert differs <= set(change) and all(getattr(cfg, k) == v for k, v in change.items()), (family.name, mode)
    assert FAMILIES["latte-1"].fp8.linear_groups and not FAMILIES["opensora-plan-v1.1"].fp8.linear_groups

    from pab.pipeline import Pipeline

    seen = []
    real = Pipeline.generate
    monkeypatch.setattr(Pipeline, "generate", lambda self, req, **kw: seen.append(
        (req.precision, self.fp8_config.linear_groups)) or real(self, req, **kw))  # fmt: skip
    case = Case("latte-tiny", "latte-1-tiny", "tiny", 4, 64, 64, 2)
    run._run_case(0, 1, case, [("off", "off")], False, 1, EngineOptions(), False,
                  precisions=("fp8+nogroups", "fp8", "fp8+nogroups"))  # fmt: skip
    timed = [groups for precision, groups in seen if precision == "fp8"][-3:]
    assert timed == [False, True, False]


def test_the_idle_share_reported_is_the_median_generations_and_every_share_is_kept():
    from bench.run import median_profile

    runs = [{"gpu_idle_pct": p, "top_kernels": [["k", p]]} for p in (14.2, 1.1, 2.0)]
    got = median_profile(runs)
    assert got["gpu_idle_pct"] == 2.0 and got["top_kernels"] == [["k", 2.0]]  # that generation's own breakdown
    assert got["gpu_idle_pcts"] == [14.2, 1.1, 2.0]
    # An even count takes the lower middle (a stalled host only adds idle); one generation is itself.
    assert median_profile(runs[:2])["gpu_idle_pct"] == 1.1
    assert median_profile(runs[:1])["gpu_idle_pct"] == 14.2
    # Without kernels (no CUDA loop found) there is nothing to rank.
    assert median_profile([{"gpu_idle_pct": None}]) == {"gpu_idle_pct": None}
    assert median_profile([]) == {}


def test_idle_takes_an_optional_count_of_profiled_generations(monkeypatch, tmp_path):
    from bench import run

    seen = []
    monkeypatch.setattr(run, "_run_case", lambda *a, **kw: seen.append(kw["idle"]) or [])
    for argv, want in (([], 0), (["--idle"], 1), (["--idle", "3"], 3), (["--idle", "--dit-only"], 1)):
        assert run.main(["--cases", "opensora-480p", "--out", str(tmp_path / "r.json"), *argv]) == 0
        assert seen.pop() == want


def test_decode_idle_takes_an_optional_count_of_profiled_generations(monkeypatch, tmp_path):
    from bench import run

    seen = []
    monkeypatch.setattr(run, "_run_case", lambda *a, **kw: seen.append(kw["decode_idle"]) or [])
    for argv, want in (([], 0), (["--decode-idle"], 1), (["--decode-idle", "2", "--idle"], 2)):
        assert run.main(["--cases", "opensora-480p", "--out", str(tmp_path / "r.json"), *argv]) == 0
        assert seen.pop() == want
