"""TEST DOUBLE of the engine (not the real pipeline): for worker/group tests before and beside it.

It behaves like `actors.engine.PipelineEngine` at the interface the worker uses: per denoising step
it asks `should_cancel()`, does one real all-reduce over the group's process group (so ranks really
move in lockstep, as DSP's all-to-alls make them), sleeps `step_s`, then reports `progress`. Frames
come from the seed, so every rank and every rerun agree. Tests of the real engine use
`actors.engine.pipeline_engine` with a `-tiny` model instead.
"""

from __future__ import annotations

import os
import time

import numpy as np

from actors.worker import EngineOutput


class FakeEngine:
    def __init__(self, model, device, dtype=None, checkpoint=None, parallel=None, step_s=0.05):
        self.model, self.device, self.checkpoint, self.parallel = model, device, checkpoint, parallel
        self.step_s = float(os.environ.get("FAKE_ENGINE_STEP_S", step_s))
        self.pid = os.getpid()
        # What a checkpoint folder held, so tests can see the worker resolved it.
        self.checkpoint_files = sorted(os.listdir(checkpoint)) if checkpoint else []

    def generate(self, request, progress, should_cancel):
        import torch
        import torch.distributed as dist

        if not request.get("prompt"):
            raise ValueError("prompt must not be empty")
        steps = int(request.get("steps") or 4)
        n = int(request.get("num_frames") or 4)
        h, w = int(request.get("height") or 32), int(request.get("width") or 32)
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        for i in range(steps):
            if should_cancel():
                raise RuntimeError(f"stopped before step {i + 1}")
            if world > 1:
                t = torch.tensor([rank + 1.0], device=self.device if str(self.device).startswith("cuda") else "cpu")
                dist.all_reduce(t)
                assert t.item() == world * (world + 1) / 2
            time.sleep(self.step_s)
            progress(i + 1, steps)
        frames = None
        if rank == 0:
            rng = np.random.default_rng(int(request["seed"]))
            frames = (rng.random((n, h, w, 3)) * 255).astype(np.uint8)
        resolved = {**request, "steps": steps, "num_frames": n, "height": h, "width": w,
                    "fps": request.get("fps") or 8}
        return EngineOutput(
            frames=frames, request=resolved, timings={"denoise_s": steps * self.step_s},
            sidecar={"pab": {"settings": {"spatial": None}, "stats": {"spatial": {"computed": steps}}},
                     "engine": "fake", "world": world, "checkpoint_files": self.checkpoint_files},
        )


def make(model, device, dtype=None, checkpoint=None, parallel=None, vae=None, text_encoder=None):
    engine = FakeEngine(model, device, dtype, checkpoint, parallel)
    engine.parts = {"vae": vae, "text_encoder": text_encoder}  # as the worker passed them on
    return engine
