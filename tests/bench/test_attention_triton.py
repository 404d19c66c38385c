"""bench.attention_triton, the d = 72 sweep: its launch configs and how it picks the best (the kernel's own tests:
tests/kernels/test_flash_attention.py)."""

import torch

from bench import attention_triton as at


def test_configs_and_best_config():
    assert at.DEFAULT_CONFIG in at.CONFIGS
    assert len(set(at.CONFIGS)) == len(at.CONFIGS)
    pointer = [c[:4] for c in at.CONFIGS if c[4] == "pointer"]
    assert len(pointer) == 36  # the whole grid
    for bm, bn, warps, stages, loads in at.CONFIGS:
        assert bm in (64, 128) and bn in (32, 64, 128) and warps in (4, 8) and stages in (2, 3, 4)
        assert loads in at.LOADS
    rows = [
        {"impl": "sdpa-cudnn", "ms": 1.0},
        {"impl": "triton", "block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3, "loads": "pointer",
         "ms": 2.0, "ok": True},
        {"impl": "triton", "block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2, "loads": "tma",
         "ms": 1.5, "ok": True},
        {"impl": "triton", "block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 4, "loads": "pointer",
         "error": "OutOfResources"},
        {"impl": "triton", "block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2, "loads": "pointer",
         "ms": 0.5, "ok": False},
    ]  # fmt: skip
    assert at.best_config(rows) == (64, 64, 4, 2, "tma")
    assert at.best_config(rows[:1] + rows[3:]) is None


def test_cross_attention_inputs_are_what_the_models_feed_the_kernel():
    """--keys: L queries against `keys` keys; "packed" gives q from an (N, L, H, D) projection and k, v from one
    (N, keys, 2, H, D), each with a unit last stride (what flash_attention reads in place)."""
    q, k, v = at.make_inputs(2, 3, 40, 72, "packed", dtype=torch.float32, device="cpu", keys=5)
    assert q.shape == (2, 3, 40, 72) and k.shape == v.shape == (2, 3, 5, 72)
    assert q.stride() == (40 * 3 * 72, 72, 3 * 72, 1) and k.stride() == (5 * 2 * 3 * 72, 72, 2 * 3 * 72, 1)
    assert v.data_ptr() - k.data_ptr() == 3 * 72 * 4  # v sits beside k in the kv projection's rows
    qs, ks, vs = at.make_inputs(2, 3, 40, 72, "nhld", dtype=torch.float32, device="cpu", keys=5)
    assert qs.is_contiguous() and ks.shape == vs.shape == (2, 3, 5, 72)
    ref = at.reference(q, k, v)
    assert ref.shape == q.shape
    torch.testing.assert_close(ref, torch.softmax(q @ k.transpose(-1, -2) / 72**0.5, -1) @ v, rtol=1e-5, atol=1e-5)
