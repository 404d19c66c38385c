"""Time one transformer forward (a CFG batch of 2) on 1 device and under DSP, with bytes moved per forward.

    python -m pab.parallel.bench --model opensora-v1.2 --frames 15 --height 60 --width 106 --sp 1 2

Weights are random (timing does not depend on them). Each `--sp N` value starts N local processes
(one GPU each with NCCL, or gloo on CPU) and reports rank 0's median forward time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pab.parallel.context import ParallelConfig, init_parallel
from pab.parallel.launch import launch_local
from pab.parallel.plans import parallelize_model


def example_inputs(name: str, model: torch.nn.Module, frames: int, height: int, width: int, device, dtype) -> dict:
    """A [cond, uncond] batch of random inputs shaped as the pipeline passes them to `name`."""
    g = torch.Generator().manual_seed(0)
    caption = model.config.caption_channels
    text_len = 300 if name.startswith("opensora-v1.2") else 120
    x = torch.randn(2, 4, frames, height, width, generator=g).to(device, dtype)
    t = torch.full((2,), 500.0, device=device)
    text = torch.randn(2, text_len, caption, generator=g).to(device, dtype)
    if name.startswith("opensora-v1.2"):
        full = lambda v: torch.full((2,), float(v), device=device)  # noqa: E731
        return dict(x=x, timestep=t, y=text[:, None], mask=torch.ones(2, text_len, dtype=torch.long, device=device),
                    fps=full(24), height=full(8 * height), width=full(8 * width))  # fmt: skip
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)


def _worker(rank: int, world: int, name: str, frames: int, height: int, width: int, dtype: str, iters: int) -> dict:
    import pab.models

    ctx = init_parallel(ParallelConfig(sp=world))
    device = ctx.device
    torch_dtype = getattr(torch, dtype)
    model = pab.models.build(name, device=device, dtype=torch_dtype)
    parallelize_model(model, ctx)
    inputs = example_inputs(name, model, frames, height, width, device, torch_dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.no_grad():
        for i in range(iters + 2):  # two warm-ups
            if i == 2:
                ctx.stats.reset()
            sync()
            start = time.perf_counter()
            model(**inputs)
            sync()
            if i >= 2:
                times.append(time.perf_counter() - start)
    stats = ctx.stats.as_dict()
    per_forward = {k: v / max(stats["forwards"], 1) for k, v in stats.items() if k != "forwards"}
    return {"sp": world, "ms": 1000 * statistics.median(times), "per_forward": per_forward}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opensora-v1.2")
    p.add_argument("--frames", type=int, default=15, help="latent frames")
    p.add_argument("--height", type=int, default=60, help="latent height")
    p.add_argument("--width", type=int, default=106, help="latent width")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    for sp in args.sp:
        # one CPU thread per process (launch_local's default): on CPU, N processes with default thread pools
        # oversubscribe the cores and spin-waiting turns milliseconds into seconds
        shape = (args.frames, args.height, args.width)
        result = launch_local(sp, _worker, args.model, *shape, args.dtype, args.iters)[0]
        print(json.dumps({"model": args.model, "latent": list(shape), **result}), flush=True)


if __name__ == "__main__":
    main()
