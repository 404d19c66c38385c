"""Spatial attention at d = 72 through cuDNN's own graph API (nvidia-cudnn-frontend), bf16 and fp8: a table and JSON.

    python -m bench.attention_cudnn                 # Open-Sora 1.2 480p: 30 x 16 heads x 1,590 tokens

torch's SDPA reaches cuDNN's bf16 flash kernel (~320 TFLOP/s at d = 72 on an H100, level with our Triton kernel,
bench.attention_triton). cuDNN also has an fp8 (e4m3) forward on Hopper, which torch does not expose: q, k, v
and the output in e4m3 with one scale each. This measures, at the model's shape: torch SDPA on strided views of
a qkv projection (what the models run), the frontend's bf16 graph on the same views, and the fp8 graph on
contiguous (N, L, H, D) e4m3 q, k, v (what a producer kernel would write) at d = 72 and padded widths, with the
output's error against float32. Needs a GPU and `pip install nvidia-cudnn-frontend`; exploratory, not a
library path.
"""

from __future__ import annotations

import argparse
import datetime
import math

import torch
import torch.nn.functional as F

from bench.fp8 import gpu_ms
from bench.records import append_records


def _graph(cudnn, handle, io, q, k, v, o, fp8: bool, scale: float, scale_o: float = 1.0):
    f32 = cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    tq, tk, tv = (g.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=io)
                  for n, t in (("q", q), ("k", k), ("v", v)))  # fmt: skip
    feeds = {}
    if fp8:
        scalars = [g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
                   for n in ("dq", "dk", "dv", "ds", "ss", "so")]  # fmt: skip
        out, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=scalars[0], descale_k=scalars[1],
                                            descale_v=scalars[2], descale_s=scalars[3], scale_s=scalars[4],
                                            scale_o=scalars[5], generate_stats=False, attn_scale=scale,
                                            use_causal_mask=False, name="sdpa_fp8")  # fmt: skip
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        ones = torch.ones(1, 1, 1, 1, device="cuda")
        # q, k, v come in unscaled (descale 1); P (<= 1) is scaled by 448 into e4m3 and back; the output by scale_o
        values = [ones, ones, ones, ones / 448.0, ones * 448.0, ones * scale_o]
        feeds.update(zip(scalars, values))
        feeds[amax_s] = torch.empty(1, 1, 1, 1, device="cuda")
        feeds[amax_o] = torch.empty(1, 1, 1, 1, device="cuda")
    else:
        out, _ = g.sdpa(q=tq, k=tk, v=tv, generate_stats=False, attn_scale=scale, use_causal_mask=False, name="sdpa")
    out.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride())).set_data_type(io)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    ws = torch.empty(g.get_workspace_size(), device="cuda", dtype=torch.uint8)
    feeds.update({tq: q, tk: k, tv: v, out: o})
    return lambda: g.execute(feeds, ws, handle=handle)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attention_cudnn", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=1590)
    p.add_argument("--head-dim", type=int, default=72)
    p.add_argument("--pad", default="72,80,96,128", help="head dims the fp8 graph is tried at (zero-padded)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import cudnn

    N, H, L, D = args.batch, args.heads, args.tokens, args.head_dim
    flop = 4 * N * H * L * L * D
    scale = 1 / math.sqrt(D)
    torch.manual_seed(0)
    qkv = torch.randn(N, L, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, L, D) strided views, as the models pass them
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # (N, H, L, D)
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    print(f"{torch.cuda.get_device_name()}, cuDNN {cudnn.backend_version_string()}, {N} x {H} heads x {L} tokens, "
          f"d = {D}; GPU ms (median of {args.iters}), TFLOP/s counted at d = {D}")  # fmt: skip
    rows = []

    def record(name, fn, out_fn):
        try:
            ms = gpu_ms(fn, args.iters)
            err = float((out_fn().float() - ref).abs().max())
            rows.append({"case": name, "ms": ms, "tflops": flop / ms / 1e9, "max_err": err})
            print(f"{name:>44} | {ms:8.3f} ms | {flop / ms / 1e9:6.1f} TFLOP/s | max err {err:.2e}")
        except Exception as e:  # noqa: BLE001 - a graph cuDNN does not support is a result too
            rows.append({"case": name, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"{name:>44} | {type(e).__name__}: {str(e)[:200]}")

    record("torch SDPA (cuDNN), bf16 views", lambda: F.scaled_dot_product_attention(q, k, v),
           lambda: F.scaled_dot_product_attention(q, k, v))  # fmt: skip
    o = torch.empty(N, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    try:
        run = _graph(cudnn, handle, cudnn.data_type.BFLOAT16, q, k, v, o, False, scale)
        record("frontend bf16 graph, views -> (N, L, H, D)", run, lambda: (run(), o)[1])
    except Exception as e:  # noqa: BLE001
        print(f"frontend bf16: {type(e).__name__}: {str(e)[:300]}")
        rows.append({"case": "frontend bf16", "error": str(e)[:300]})
    for width in (int(w) for w in args.pad.split(",")):
        pad = (0, width - D)
        # contiguous (N, L, H, d) e4m3, as a producer kernel would write them; zero channels change nothing
        q8, k8, v8 = (F.pad(t.transpose(1, 2), pad).to(torch.float8_e4m3fn).contiguous().transpose(1, 2)
                      for t in (q, k, v))  # fmt: skip
        o8 = torch.empty(N, L, H, width, device="cuda", dtype=torch.float8_e4m3fn).transpose(1, 2)
        name = f"frontend fp8 graph, d = {width}"
        try:
            so = 448.0 / float(v8.float().abs().max())  # |out| <= max |v|: softmax weights sum to 1
            run8 = _graph(cudnn, handle, cudnn.data_type.FP8_E4M3, q8, k8, v8, o8, True, scale, so)
            record(name, run8, lambda o8=o8, run8=run8, so=so: (run8(), o8[..., :D].float() / so)[1])
        except Exception as e:  # noqa: BLE001
            print(f"{name}: {type(e).__name__}: {str(e)[:300]}")
            rows.append({"case": name, "error": str(e)[:300]})
    if args.out:
        append_records(args.out, {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
                                  "torch": torch.__version__, "cudnn": cudnn.backend_version_string(),
                                  "shape": [N, H, L, D], "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
