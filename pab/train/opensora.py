"""Open-Sora 1.2 at the `-small` size, trained on the synthetic shapes (pab.data.shapes).

Two stages, each resumable, each writing its part of the `--checkpoint` layout into `out`:

1. `vae`: the Open-Sora VAE (a per-frame AutoencoderKL, then the causal temporal VAE) trained end to end
   on 17-frame 64x64 clips: L1 + MSE of the full round trip and of the 2D stage alone, MSE of the temporal
   stage on the spatial latents, and a small KL on both posteriors. Then the latents' per-channel mean and
   std become the VAE's `shift` / `scale`, so the DiT sees unit-variance latents as in the release.
2. `dit`: STDiT3 and the small T5 together, the VAE frozen. Rectified flow as Open-Sora trains it: s from a
   logit-normal, shifted by the same resolution/length transform the sampler applies (with the small size's
   transform scale that is r = 1 at 64x64 px: no shift, see `OpenSora12.sampler_options`), x_s = (1 - s) x0 + s n,
   target x0 - n; 10% of captions replaced by the model's null caption (`y_embedding`) for CFG; the
   pipeline's prompt suffix appended, as at inference. The EMA of the weights is what gets exported.

Weights are exported in bf16 with a manifest (name, shape, dtype, sha256 of each file) and `training.json`
saying what the model learned from.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pab.data import shapes
from pab.families import get_family
from pab.models import VAE_SPECS, get_spec
from pab.models.opensora_vae import SPATIAL_LATENT_SCALE, OpenSoraVAE, OpenSoraVAEConfig
from pab.models.stdit3 import STDiT3, build_stdit3
from pab.samplers.rflow import NUM_TIMESTEPS, shift_ratio, shift_timesteps
from pab.train.loop import EMA, LoopConfig, load_state, run, save_state, step_generator

NAME = "opensora-v1.2-small"


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
    """Start from these weights (a checkpoint folder's part) instead of a fresh initialisation."""
    ema: float = 0.995


def _geometry() -> tuple[int, int, int, int]:
    d = get_spec(NAME).defaults_for("small")
    return d.num_frames, d.height, d.width, d.fps


def _autocast(device: torch.device):
    # bf16 matmuls on the GPU; float32 on the CPU (the CPU test run), where bf16 is slow.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _batch(size: int, seed: int, step: int, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """`size` clips (B, 3, F, H, W) in [-1, 1] and captions of batch `step`: a function of (seed, step) only."""
    F_, H, W, _ = _geometry()
    gen = step_generator(seed, step)
    scenes = shapes.sample_scenes(size, gen)
    return shapes.render(scenes, F_, H, W, gen, device), [s.caption() for s in scenes]


# ----------------------------------------------------------------------------------------------------
# Stage 1: the VAE
# ----------------------------------------------------------------------------------------------------


def vae_loss(vae: OpenSoraVAE, video: torch.Tensor, kl_weight: float = 1e-6) -> torch.Tensor:
    """The round trip (2D posterior mean, temporal posterior sampled); video (B, 3, F, H, W) in [-1, 1], one chunk."""
    B, _, T, _, _ = video.shape
    frames = video.transpose(1, 2).flatten(0, 1)  # (B·F, 3, H, W)
    post2d = vae.spatial_vae.module.encode(frames).latent_dist
    x_z = post2d.mean * SPATIAL_LATENT_SCALE  # (B·F, 4, h, w); the mean: a sampled target made the loss spiky
    x_z = x_z.unflatten(0, (B, T)).transpose(1, 2)  # (B, 4, F, h, w)
    mean, logvar = vae.temporal_vae.encode(x_z).float().chunk(2, dim=1)  # each (B, 4, t, h, w)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    x_z_rec = vae.temporal_vae.decode(z, T)  # (B, 4, F, h, w)
    both = torch.cat([x_z_rec, x_z], 0).transpose(1, 2).flatten(0, 1) / SPATIAL_LATENT_SCALE
    rec, rec2d = vae.spatial_vae.module.decode(both).sample.float().unflatten(0, (2 * B, T)).transpose(1, 2).chunk(2)
    pixel = sum(F.l1_loss(r, video) + F.mse_loss(r, video) for r in (rec, rec2d))
    # On the unscaled 2D latents: weighted this strongly, the temporal stage learns its job fastest.
    latent = F.mse_loss(x_z_rec.float(), x_z.detach().float()) / SPATIAL_LATENT_SCALE**2
    kl = post2d.kl().mean() + 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3, 4)).mean()
    return pixel + latent + kl_weight * kl


@torch.no_grad()
def calibrate_latents(vae: OpenSoraVAE, device: torch.device, clips: int = 256, seed: int = 10_000) -> None:
    """Set `shift` / `scale` to the per-channel mean and std of the latents of `clips` fresh clips."""
    vae.scale.fill_(1.0)
    vae.shift.fill_(0.0)
    zs = []
    for i in range(0, clips, 64):
        video, _ = _batch(min(64, clips - i), seed, i, device)
        with _autocast(device):
            zs.append(vae.encode(video).float())  # (b, 4, t, h, w) with scale 1, shift 0
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # (4, N)
    mean, std = z.mean(dim=1), z.std(dim=1)
    vae.shift.copy_(mean.view_as(vae.shift))
    vae.scale.copy_(std.view_as(vae.scale))
    vae.config.shift, vae.config.scale = tuple(mean.tolist()), tuple(std.tolist())


def train_vae(cfg: StageConfig, work: Path, out: Path, device: torch.device) -> dict:
    torch.manual_seed(cfg.seed)
    vae = OpenSoraVAE(OpenSoraVAEConfig.from_size("small")).to(device).train()
    if cfg.init is not None:
        vae.load_state_dict(VAE_SPECS["opensora-vae-v1.2"].load("small", cfg.init, device).state_dict())
        print(f"[vae] starting from the weights in {cfg.init}", flush=True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    state_file = work / "vae.pt"
    start = load_state(state_file, {"vae": vae, "opt": opt}, device) if cfg.resume and state_file.is_file() else 0

    def step(i: int) -> torch.Tensor:
        video, _ = _batch(cfg.batch, cfg.seed, i, device)
        _warmup(opt, cfg.lr, i)
        with _autocast(device):
            loss = vae_loss(vae, video)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    loop = LoopConfig(cfg.steps, cfg.minutes, cfg.log_every, cfg.save_every, cfg.batch)
    last, history = run(step, start, loop, "vae", lambda i: save_state(state_file, i, {"vae": vae, "opt": opt}))
    vae.eval()
    calibrate_latents(vae, device)
    psnr = reconstruction_psnr(vae, device)
    print(f"[vae] latents: shift {vae.config.shift}, scale {vae.config.scale}; round-trip PSNR {psnr:.2f} dB")
    _export(vae.state_dict(), vae.config.to_dict(), out / "vae")
    info = {"steps": last, "seconds": time.perf_counter() - t0, "loss": history[-1][1] if history else None,
            "psnr_db": psnr, "batch": cfg.batch, "lr": cfg.lr,
            "init": str(cfg.init) if cfg.init else None}  # fmt: skip
    _write_training_info(out, "vae", info)
    return info


@torch.no_grad()
def reconstruction_psnr(vae: OpenSoraVAE, device: torch.device, clips: int = 64, seed: int = 20_000) -> float:
    """Mean PSNR (dB, on [0, 1] pixels) of encode -> decode on fresh clips."""
    F_ = _geometry()[0]
    video, _ = _batch(clips, seed, 0, device)
    with _autocast(device):
        rec = vae.decode(vae.encode(video), F_).float().clamp(-1, 1)
    mse = ((rec - video) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


# ----------------------------------------------------------------------------------------------------
# Stage 2: STDiT3 + T5
# ----------------------------------------------------------------------------------------------------


def build_text_parts(seed: int = 0):
    """The small T5 (random init from `seed`) and its word-level tokenizer over the captions' vocabulary."""
    from transformers import T5Config, T5EncoderModel

    from pab.text import SMALL_T5_CONFIG, word_tokenizer

    suffix = get_spec(NAME).prompt_suffix  # the pipeline appends it; training sees it too
    tokenizer = word_tokenizer(shapes.caption_words() + suffix.replace(":", " : ").replace(".", " . ").split())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = T5EncoderModel(T5Config(**{**SMALL_T5_CONFIG, "vocab_size": len(tokenizer)}))
    return t5, tokenizer


def flow_loss(
    dit: STDiT3, z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, fps: int, size: tuple,
    ratio: float,
) -> torch.Tensor:
    """Rectified-flow loss of one batch of normalised latents z (B, C, t, h, w); y (B, L, D) text, mask (B, L);
    training times shifted by `ratio` as the sampler shifts its timesteps."""
    B = z.shape[0]
    F_, H, W = size
    s = torch.sigmoid(torch.randn(B, generator=gen)).to(z.device)  # logit-normal in (0, 1)
    s = shift_timesteps(s.double(), ratio).float()
    noise = torch.randn(z.shape, generator=gen).to(z.device)
    s_ = s.view(B, 1, 1, 1, 1)
    x_t = (1 - s_) * z + s_ * noise
    out = dit(x_t, s * NUM_TIMESTEPS, y[:, None], mask=mask, fps=torch.full((B,), float(fps), device=z.device),
              height=float(H), width=float(W))  # fmt: skip
    return F.mse_loss(out[:, : z.shape[1]].float(), z - noise)


def train_dit(cfg: StageConfig, work: Path, out: Path, device: torch.device, cfg_dropout: float = 0.1) -> dict:
    F_, H, W, fps = _geometry()
    if not (out / "vae" / "config.json").is_file() and cfg.init is not None and (cfg.init / "vae").is_dir():
        shutil.copytree(cfg.init / "vae", out / "vae")  # the checkpoint being continued brings its VAE
        before = json.loads((cfg.init / "training.json").read_text()) if (cfg.init / "training.json").is_file() else {}
        if "vae" in before.get("stages", {}):  # and the record of how that VAE was trained
            _write_training_info(out, "vae", before["stages"]["vae"], stamp=False)
    if not (out / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"{out / 'vae'} holds no trained VAE; run the vae stage first (--stage vae)")
    vae = VAE_SPECS["opensora-vae-v1.2"].load("small", out / "vae", device).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    dit = build_stdit3("small").to(device).train()
    t5, tokenizer = build_text_parts(cfg.seed)
    if cfg.init is not None:  # continue from exported weights (a fresh optimizer; the warm-up restarts)
        from pab.text import TextEncoder

        # Into the fresh model, so that its requires_grad flags (RoPE's frequencies stay fixed) are kept.
        dit.load_state_dict(get_spec(NAME).transformer.load("small", cfg.init / "transformer", device).state_dict())
        t5 = TextEncoder.from_pretrained(cfg.init / "text_encoder", max_length=1).model
        print(f"[dit] starting from the weights in {cfg.init}", flush=True)
    t5 = t5.to(device=device, dtype=torch.float32).train().requires_grad_(True)
    max_length = get_spec(NAME).text_max_length_for("small")
    params = [p for m in (dit, t5) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = {"dit": EMA(dit, cfg.ema), "t5": EMA(t5, cfg.ema)}
    state_file = work / "dit.pt"
    objects = {"dit": dit, "t5": t5, "opt": opt, "ema_dit": ema["dit"], "ema_t5": ema["t5"]}
    start = load_state(state_file, objects, device) if cfg.resume and state_file.is_file() else 0
    suffix = get_spec(NAME).prompt_suffix
    null = dit.y_embedder.y_embedding  # (L_max, D): Open-Sora's learned-null caption, the CFG negative
    ratio = shift_ratio(H, W, F_, get_family(NAME).sampler_options("small").get("transform_scale", 1.0))

    def step(i: int) -> torch.Tensor:
        video, captions = _batch(cfg.batch, cfg.seed, i, device)
        gen = step_generator(cfg.seed + 1, i)
        with torch.no_grad(), _autocast(device):
            z = vae.encode(video).float()  # (B, 4, 5, 16, 16), unit variance per channel
        tok = tokenizer([c + suffix for c in captions], max_length=max_length, padding="max_length",
                        truncation=True, return_tensors="pt")  # fmt: skip
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        _warmup(opt, cfg.lr, i)
        with _autocast(device):
            y = t5(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
            drop = (torch.rand(len(captions), generator=gen) < cfg_dropout).to(device)
            y = torch.where(drop[:, None, None], null[None, : y.shape[1]].to(y.dtype), y)
            loss = flow_loss(dit, z, y, mask, gen, fps, (F_, H, W), ratio)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema["dit"].update(dit, i)
        ema["t5"].update(t5, i)
        return loss

    t0 = time.perf_counter()
    loop = LoopConfig(cfg.steps, cfg.minutes, cfg.log_every, cfg.save_every, cfg.batch)
    last, history = run(step, start, loop, "dit", lambda i: save_state(state_file, i, objects))
    export_text_and_dit(ema, dit, t5, tokenizer, out)
    info = {"steps": last, "seconds": time.perf_counter() - t0, "loss": history[-1][1] if history else None,
            "loss_history": history, "batch": cfg.batch, "lr": cfg.lr, "cfg_dropout": cfg_dropout,
            "time_shift_ratio": ratio,
            "init": _init_record(cfg.init)}  # fmt: skip
    _write_training_info(out, "dit", info)
    return info


def _init_record(init: Path | None) -> dict | None:
    """Where a continued DiT started: the folder and its own DiT training (so a chain of runs stays on record)."""
    if init is None:
        return None
    doc = json.loads((init / "training.json").read_text()) if (init / "training.json").is_file() else {}
    before = {k: v for k, v in doc.get("stages", {}).get("dit", {}).items() if k != "loss_history"}
    return {"path": str(init), "dit": before or None}


def export_text_and_dit(ema: dict[str, EMA], dit: STDiT3, t5, tokenizer, out: Path) -> None:
    """The EMA weights in the checkpoint layout: transformer/, text_encoder/ (transformers' format), tokenizer/."""
    _export(ema["dit"].state_dict(), asdict(dit.config), out / "transformer")
    ema["t5"].copy_to(t5)
    folder = out / "text_encoder"
    folder.mkdir(parents=True, exist_ok=True)
    t5.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    t5.float()
    tokenizer.save_pretrained(out / "tokenizer")
    # The generic fast-tokenizer class loads in transformers 4 and 5 alike (5 writes its own new name).
    cfg_file = out / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=get_spec(NAME).text_max_length_for("small"))
    cfg.pop("backend", None)
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    _write_manifest(out)


# ----------------------------------------------------------------------------------------------------
# Shared
# ----------------------------------------------------------------------------------------------------


def _warmup(opt: torch.optim.Optimizer, lr: float, step: int, steps: int = 200) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * min(1.0, (step + 1) / steps)


def _export(state: dict[str, torch.Tensor], config: dict, folder: Path) -> None:
    """bf16 safetensors + config.json; the strict loader casts back to the model's dtype."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state.items()}  # fmt: skip
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
    _write_manifest(folder.parent)


def _write_manifest(out: Path) -> None:
    """manifest.json: every weight file with its sha256 and tensors (name, shape, dtype)."""
    from safetensors import safe_open

    files = {}
    for f in sorted(out.glob("*/*.safetensors")):
        with safe_open(str(f), "pt") as st:
            tensors = {k: [list(st.get_slice(k).get_shape()), st.get_slice(k).get_dtype()] for k in st.keys()}
        files[str(f.relative_to(out))] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "tensors": tensors}
    (out / "manifest.json").write_text(json.dumps({"model": NAME, "files": files}, indent=1) + "\n")


def _write_training_info(out: Path, stage: str, info: dict, stamp: bool = True) -> None:
    """training.json: what the model was trained on, how long, where; the demo prints its summary."""
    path = out / "training.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    F_, H, W, fps = _geometry()
    doc["model"] = NAME
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
