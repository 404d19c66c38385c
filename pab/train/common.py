"""What every family's training shares: the stage knobs, the clip batches, bf16 export with a manifest, and
`training.json` (what a checkpoint learned from), all keyed by the `-small` model's name."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pab.data import shapes
from pab.models import get_spec
from pab.train.loop import step_generator


@dataclass
class StageConfig:
    """One stage's knobs (the CLI fills these)."""

    steps: int
    batch: int
    lr: float
    minutes: float | None = None
    seed: int = 0
    log_every: int = 50
    save_every: int = 1000
    resume: bool = False
    init: Path | None = None
    """Start from these weights (a checkpoint folder or its part) instead of a fresh initialisation."""
    ema: float = 0.995
    eval_clips: int = 256
    """VAE stage: fresh clips for the latent calibration; a quarter of them for the round-trip PSNR."""


def geometry(name: str) -> tuple[int, int, int, int]:
    """(frames, height, width, fps) of a `-small` model's clips: its request defaults."""
    d = get_spec(name).defaults_for("small")
    return d.num_frames, d.height, d.width, d.fps


def autocast(device: torch.device):
    # bf16 matmuls on the GPU; float32 on the CPU (the CPU test run), where bf16 is slow.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def clip_batch(name: str, size: int, seed: int, step: int, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """`size` clips (B, 3, F, H, W) in [-1, 1] and captions of batch `step`: a function of (seed, step) only."""
    F_, H, W, _ = geometry(name)
    gen = step_generator(seed, step)
    scenes = shapes.sample_scenes(size, gen)
    return shapes.render(scenes, F_, H, W, gen, device), [s.caption() for s in scenes]


def warmup(opt: torch.optim.Optimizer, lr: float, step: int, steps: int = 200) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * min(1.0, (step + 1) / steps)


def export_weights(state: dict[str, torch.Tensor], config: dict, folder: Path) -> None:
    """bf16 safetensors + config.json; the strict loader casts back to the model's dtype. (The stage that
    exports writes the checkpoint's manifest once it has written all its parts.)"""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state.items()}  # fmt: skip
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")


def write_manifest(out: Path, name: str) -> None:
    """manifest.json: every weight file with its sha256 and tensors (name, shape, dtype)."""
    from safetensors import safe_open

    files = {}
    for f in sorted(out.glob("*/*.safetensors")):
        with safe_open(str(f), "pt") as st:
            tensors = {k: [list(st.get_slice(k).get_shape()), st.get_slice(k).get_dtype()] for k in st.keys()}
        files[str(f.relative_to(out))] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "tensors": tensors}
    (out / "manifest.json").write_text(json.dumps({"model": name, "files": files}, indent=1) + "\n")


def write_training_info(out: Path, name: str, stage: str, info: dict, stamp: bool = True) -> None:
    """training.json: what the model was trained on, how long, where; the demo prints its summary."""
    path = out / "training.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    F_, H, W, fps = geometry(name)
    doc["model"] = name
    doc["data"] = (
        f"synthetic clips made by pab.data.shapes: {F_} frames of {W}x{H} px; one or two "
        f"{'/'.join(shapes.SHAPES)} in {len(shapes.COLOURS)} colours moving left/right/up/down (slowly or quickly), "
        f"staying still or growing, on {len(shapes.BACKGROUNDS)} plain backgrounds; "
        f"{len(shapes.held_out_scenes())} held-out prompts never drawn"
    )
    doc["vocabulary"] = shapes.VOCABULARY
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    here = {"device": dev, "torch": torch.__version__, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    doc.setdefault("stages", {})[stage] = {**info, **here} if stamp else info  # stamp=False: a copied record
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))


def init_record(init: Path | None, stage: str = "dit") -> dict | None:
    """Where a continued stage started: the folder and its own training record (a chain of runs stays on record)."""
    if init is None:
        return None
    doc = json.loads((init / "training.json").read_text()) if (init / "training.json").is_file() else {}
    before = {k: v for k, v in doc.get("stages", {}).get(stage, {}).items() if k != "loss_history"}
    return {"path": str(init), stage: before or None}


@torch.no_grad()
def reconstruction_psnr(name: str, vae, device: torch.device, clips: int = 64, seed: int = 20_000) -> float:
    """Mean PSNR (dB, on [0, 1] pixels) of a VideoVAE's encode -> decode on fresh clips."""
    F_ = geometry(name)[0]
    video, _ = clip_batch(name, clips, seed, 0, device)
    recs = []
    for part in video.split(16):
        with autocast(device):
            recs.append(vae.decode(vae.encode(part), F_).float().clamp(-1, 1))
    mse = ((torch.cat(recs) - video) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())
