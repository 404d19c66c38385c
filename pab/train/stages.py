"""The two training stages every `-small` model goes through, with what differs per family in a `Recipe`.

1. `vae`: the family's video VAE trained end to end on the synthetic clips (the recipe's loss), then its
   latents' per-channel statistics become the normalisation the DiT sees (unit-variance latents, as in
   the releases), and the round-trip PSNR is recorded.
2. `dit`: the family's transformer and the small T5 together, the VAE frozen, on the family's own
   objective (rectified flow for Open-Sora 1.2, DDPM noise prediction for Latte-1 and Open-Sora-Plan), called
   through the same `Family.forward` inference uses. 10% of captions are replaced by the family's
   unconditional text (what classifier-free guidance runs at inference). The EMA of the weights is exported.

Weights are exported in bf16 with a manifest (name, shape, dtype, sha256 of each file) and `training.json`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from pab.data import shapes
from pab.families import get_family
from pab.models import get_spec
from pab.train.common import (
    StageConfig, autocast, clip_batch, export_weights, geometry, init_record, reconstruction_psnr, warmup,
    write_manifest, write_training_info,
)  # fmt: skip
from pab.train.loop import EMA, LoopConfig, load_state, run, save_state, step_generator


class Recipe:
    """What one family's `-small` model trains with. Subclasses fill in the VAE's part and the objective."""

    name: str = ""
    """The `-small` model this recipe trains, e.g. "latte-1-small"."""
    dit_record: dict = {}
    """What training.json records of the DiT stage's objective beyond the common fields."""
    calibration_batch = 32
    """Clips per batch when the latent statistics are measured (the batches are drawn from the seed)."""

    # ---- the VAE stage
    def new_vae(self) -> nn.Module:
        raise NotImplementedError

    def load_vae_weights(self, vae: nn.Module, folder: Path, device: torch.device) -> None:
        """Copy the weights of a `vae/` folder (as exported) into `vae`, to continue training it."""
        if folder.name != "vae":
            raise ValueError(f"{folder}: pass a checkpoint's vae/ folder or the checkpoint that holds it")
        vae.load_state_dict(get_family(self.name).load_vae("small", folder, device, torch.float32).state_dict())

    def vae_loss(self, vae: nn.Module, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def raw_latents(self, vae: nn.Module, video: torch.Tensor) -> torch.Tensor:
        """The posterior means of a batch of clips, before any normalisation: (B or B·F, C, ...)."""
        raise NotImplementedError

    def set_latent_stats(self, vae: nn.Module, mean: list[float], std: list[float]) -> dict:
        """Make the VAE normalise its latents per channel with these statistics (and save them with it); returns
        what training.json records of them."""
        raise NotImplementedError

    @torch.no_grad()
    def calibrate(self, vae: nn.Module, device: torch.device, clips: int = 256, seed: int = 10_000) -> dict:
        """Set the latent normalisation from fresh clips; returns what was set (for training.json)."""
        zs = []
        n = self.calibration_batch
        for i in range(0, clips, n):
            video, _ = clip_batch(self.name, min(n, clips - i), seed, i, device)
            with autocast(device):
                zs.append(self.raw_latents(vae, video).float())
        return self.set_latent_stats(vae, *raw_latent_stats(zs))

    def export_vae(self, vae: nn.Module, folder: Path) -> None:
        raise NotImplementedError

    # ---- the DiT stage
    def dit_loss(self, dit: nn.Module, z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:  # fmt: skip
        """The objective on one batch of normalised latents z (B, C, t, h, w), text y (B, L, D), mask (B, L)."""
        raise NotImplementedError

    def null_text(self, dit: nn.Module, t5: nn.Module, tokenizer, max_length: int,
                  device: torch.device) -> torch.Tensor:  # fmt: skip
        """(L, D): the text a dropped caption becomes, as classifier-free guidance's negative is at inference."""
        raise NotImplementedError

    def forward(self, dit: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
        """The transformer's output through the family adapter, exactly as the pipeline calls it."""
        F_, H, W, fps = geometry(self.name)
        request = SimpleNamespace(fps=fps, height=H, width=W, num_frames=F_)
        return get_family(self.name).forward(dit, x, t, y, mask, request)


def state_file(work: Path, stage: str) -> Path:
    """Where a stage ("vae" or "dit") keeps its resumable state in the work folder."""
    return work / f"{stage}.pt"


def raw_latent_stats(latents: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (b, C, ...) latents."""
    z = torch.cat([x.float() for x in latents]).transpose(0, 1).flatten(1)  # (C, N)
    return z.mean(dim=1).tolist(), z.std(dim=1).tolist()


# ----------------------------------------------------------------------------------------------------
# Stage 1: the VAE
# ----------------------------------------------------------------------------------------------------


def train_vae(recipe: Recipe, cfg: StageConfig, work: Path, out: Path, device: torch.device) -> dict:
    torch.manual_seed(cfg.seed)
    vae = recipe.new_vae().to(device)
    folder = None  # where a continued VAE came from
    if cfg.init is not None:
        folder = cfg.init if (cfg.init / "config.json").is_file() else cfg.init / "vae"
        recipe.load_vae_weights(vae, folder, device)
        print(f"[vae] starting from the weights in {folder}", flush=True)
    vae.train().requires_grad_(True)
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    saved = state_file(work, "vae")
    start = load_state(saved, {"vae": vae, "opt": opt}, device) if cfg.resume and saved.is_file() else 0

    def step(i: int) -> torch.Tensor:
        video, _ = clip_batch(recipe.name, cfg.batch, cfg.seed, i, device)
        warmup(opt, cfg.lr, i)
        with autocast(device):
            loss = recipe.vae_loss(vae, video)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    loop = LoopConfig(cfg.steps, cfg.minutes, cfg.log_every, cfg.save_every, cfg.batch)
    last, history = run(step, start, loop, "vae", lambda i: save_state(saved, i, {"vae": vae, "opt": opt}))
    vae.eval().requires_grad_(False)
    stats = recipe.calibrate(vae, device, clips=cfg.eval_clips)
    psnr = reconstruction_psnr(recipe.name, vae, device, clips=max(1, cfg.eval_clips // 4))
    print(f"[vae] latents: {stats}; round-trip PSNR {psnr:.2f} dB", flush=True)
    recipe.export_vae(vae, out / "vae")
    write_manifest(out, recipe.name)
    info = {"steps": last, "seconds": time.perf_counter() - t0, "loss": history[-1][1] if history else None,
            "psnr_db": psnr, "batch": cfg.batch, "lr": cfg.lr, "latents": stats,
            "init": init_record(folder.parent, "vae") if cfg.init else None}  # fmt: skip
    write_training_info(out, recipe.name, "vae", info)
    return info


# ----------------------------------------------------------------------------------------------------
# Stage 2: the DiT and the small T5
# ----------------------------------------------------------------------------------------------------


def build_text_parts(name: str, seed: int = 0):
    """The small T5 (random init from `seed`) and its word-level tokenizer over the captions' vocabulary."""
    from transformers import T5Config, T5EncoderModel

    from pab.text import SMALL_T5_CONFIG, word_tokenizer

    suffix = get_spec(name).prompt_suffix  # the pipeline appends it; training sees it too
    tokenizer = word_tokenizer(shapes.caption_words() + suffix.replace(":", " : ").replace(".", " . ").split())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = T5EncoderModel(T5Config(**{**SMALL_T5_CONFIG, "vocab_size": len(tokenizer)}))
    return t5, tokenizer


def train_dit(recipe: Recipe, cfg: StageConfig, work: Path, out: Path, device: torch.device,
              cfg_dropout: float = 0.1) -> dict:  # fmt: skip
    name = recipe.name
    spec, family = get_spec(name), get_family(name)
    _take_vae_from(cfg.init, out, name)
    if not (out / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"{out / 'vae'} holds no trained VAE; run the vae stage first (--stage vae)")
    vae = family.load_vae("small", out / "vae", device, torch.float32)
    if hasattr(vae, "micro_batch_size"):  # a per-frame VAE: 64 px frames all at once (8 at a time is for 512 px)
        vae.micro_batch_size = 1 << 20
    torch.manual_seed(cfg.seed)
    dit = spec.transformer.build("small").to(device).train()
    t5, tokenizer = build_text_parts(name, cfg.seed)
    if cfg.init is not None:  # continue from exported weights (a fresh optimizer; the warm-up restarts)
        from pab.text import TextEncoder

        # Into the fresh model, so that its requires_grad flags (fixed tables stay fixed) are kept.
        dit.load_state_dict(spec.transformer.load("small", cfg.init / "transformer", device).state_dict())
        t5 = TextEncoder.from_pretrained(cfg.init / "text_encoder", max_length=1).model
        print(f"[dit] starting from the weights in {cfg.init}", flush=True)
    t5 = t5.to(device=device, dtype=torch.float32).train().requires_grad_(True)
    max_length = spec.text_max_length_for("small")
    params = [p for m in (dit, t5) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = {"dit": EMA(dit, cfg.ema), "t5": EMA(t5, cfg.ema)}
    saved = state_file(work, "dit")
    objects = {"dit": dit, "t5": t5, "opt": opt, "ema_dit": ema["dit"], "ema_t5": ema["t5"]}
    start = load_state(saved, objects, device) if cfg.resume and saved.is_file() else 0
    suffix = spec.prompt_suffix

    def step(i: int) -> torch.Tensor:
        video, captions = clip_batch(name, cfg.batch, cfg.seed, i, device)
        gen = step_generator(cfg.seed + 1, i)
        with torch.no_grad(), autocast(device):
            z = vae.encode(video).float()  # (B, C, t, h, w), unit variance per channel
        tok = tokenizer([c + suffix for c in captions], max_length=max_length, padding="max_length",
                        truncation=True, return_tensors="pt")  # fmt: skip
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        warmup(opt, cfg.lr, i)
        with autocast(device):
            y = t5(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
            drop = (torch.rand(len(captions), generator=gen) < cfg_dropout).to(device)
            if bool(drop.any()):
                # The caption's mask stays: at inference the negative is cut to the prompt's length too.
                null = recipe.null_text(dit, t5, tokenizer, max_length, device)[: y.shape[1]]
                y = torch.where(drop[:, None, None], null[None].to(y.dtype), y)
            loss = recipe.dit_loss(dit, z, y, mask, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema["dit"].update(dit, i)
        ema["t5"].update(t5, i)
        return loss

    t0 = time.perf_counter()
    loop = LoopConfig(cfg.steps, cfg.minutes, cfg.log_every, cfg.save_every, cfg.batch)
    last, history = run(step, start, loop, "dit", lambda i: save_state(saved, i, objects))
    export_text_and_dit(name, ema, dit, t5, tokenizer, out)
    info = {"steps": last, "seconds": time.perf_counter() - t0, "loss": history[-1][1] if history else None,
            "loss_history": history, "batch": cfg.batch, "lr": cfg.lr, "cfg_dropout": cfg_dropout,
            **recipe.dit_record, "init": init_record(cfg.init)}  # fmt: skip
    write_training_info(out, name, "dit", info)
    return info


def _take_vae_from(init: Path | None, out: Path, name: str) -> None:
    """A continued run without a VAE of its own takes the one of the checkpoint it continues, with its record."""
    if (out / "vae" / "config.json").is_file() or init is None or not (init / "vae").is_dir():
        return
    shutil.copytree(init / "vae", out / "vae")
    before = json.loads((init / "training.json").read_text()) if (init / "training.json").is_file() else {}
    if "vae" in before.get("stages", {}):
        write_training_info(out, name, "vae", before["stages"]["vae"], stamp=False)


def _config_dict(config) -> dict:
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if to_dict is not None else asdict(config) if is_dataclass(config) else dict(config)


def export_text_and_dit(name: str, ema: dict[str, EMA], dit: nn.Module, t5, tokenizer, out: Path) -> None:
    """The EMA weights in the checkpoint layout: transformer/, text_encoder/ (transformers' format), tokenizer/."""
    export_weights(ema["dit"].state_dict(), _config_dict(dit.config), out / "transformer")
    ema["t5"].copy_to(t5)
    folder = out / "text_encoder"
    folder.mkdir(parents=True, exist_ok=True)
    t5.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    t5.float()
    tokenizer.save_pretrained(out / "tokenizer")
    # The generic fast-tokenizer class loads in transformers 4 and 5 alike (5 writes its own new name).
    cfg_file = out / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=get_spec(name).text_max_length_for("small"))
    cfg.pop("backend", None)
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    write_manifest(out, name)
