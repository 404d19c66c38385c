"""bench.vae: every way it runs a VAE decodes the same frames, and the run is recorded."""

import json

import pytest

from bench import vae as bench_vae
from support.kernels import DEVICE, needs_triton


@pytest.mark.parametrize("model", ["opensora-v1.2", "opensora-plan-v1.1"])
def test_each_variant_decodes_the_frames_the_shipped_way_does(tmp_path, model):
    out = tmp_path / "vae.json"
    variants = "eager,channels-last,mb-all,mb8+cudnn-benchmark" if model == "opensora-v1.2" else "eager,channels-last"
    args = ["--model", model, "--vae-size", "tiny", "--device", "cpu", "--dtype", "float32", "--frames", "17",
            "--size", "64x64", "--iters", "1", "--variants", variants, "--out", str(out)]  # fmt: skip
    assert bench_vae.main(args) == 0
    [record] = json.loads(out.read_text())
    assert [r["variant"] for r in record["rows"]] == variants.split(",")
    assert record["size"] == "64x64" and record["latents"][2] == 5  # 17 frames -> one 5-latent chunk
    for r in record["rows"]:
        assert r["decode_s"] > 0 and r["psnr_vs_first_db"] > 90, r  # float32 reordering at most


@needs_triton
def test_the_kernel_variant_decodes_the_same_frames(tmp_path):
    """gn-kernel runs every GroupNorm through the Triton kernels (on a GPU, or in the CPU interpreter), with the
    conv biases left to the norms and the subpixel upsamplers."""
    out = tmp_path / "vae.json"
    variants = "eager,channels-last+gn-kernel,gn-kernel-unfolded"
    args = ["--model", "opensora-v1.2", "--vae-size", "tiny", "--device", DEVICE, "--dtype", "float32", "--frames",
            "5", "--size", "32x32", "--iters", "1", "--variants", variants, "--out", str(out)]  # fmt: skip
    assert bench_vae.main(args) == 0
    rows = json.loads(out.read_text())[0]["rows"]
    assert [r["variant"] for r in rows] == variants.split(",")
    # float32 summed in another order: exact to rounding on the CPU; cuDNN's TF32 convolutions round more.
    assert all(r["psnr_vs_first_db"] > (90 if DEVICE == "cpu" else 50) for r in rows[1:]), rows


def test_profile_names_where_the_time_goes(tmp_path):
    out = tmp_path / "vae.json"
    args = ["--model", "opensora-v1.2", "--vae-size", "tiny", "--device", "cpu", "--dtype", "float32", "--frames",
            "17", "--size", "32x32", "--iters", "1", "--variants", "eager", "--profile", "--out", str(out)]  # fmt: skip
    assert bench_vae.main(args) == 0
    [row] = json.loads(out.read_text())[0]["rows"]
    names = [k["name"] for k in row["profile"]]
    assert any("conv" in n for n in names) and all(k["ms"] > 0 and 0 < k["share"] <= 1 for k in row["profile"])


def test_a_micro_batch_on_a_vae_without_one_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no 2D micro-batch"):
        bench_vae.main(["--model", "opensora-plan-v1.1", "--vae-size", "tiny", "--device", "cpu", "--dtype",
                        "float32", "--frames", "17", "--size", "64x64", "--variants", "mb8",
                        "--out", str(tmp_path / "v.json")])  # fmt: skip


def test_float32_reference_measures_the_half_precision_decode_own_error(tmp_path):
    """--float32-reference: a float32 decode of the same weights and latents; bf16's own rounding shows."""
    out = tmp_path / "vae.json"
    args = ["--model", "opensora-v1.2", "--vae-size", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--frames",
            "5", "--size", "32x32", "--iters", "1", "--variants", "eager", "--float32-reference", "--out", str(out)]
    assert bench_vae.main(args) == 0
    [row] = json.loads(out.read_text())[0]["rows"]
    assert 20 < row["psnr_vs_float32_db"] < 90, row  # bf16 rounding: neither exact nor another decode
