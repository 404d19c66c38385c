"""`python -m pab.train`: train a `-small` model on the synthetic shapes, resumable, one command.

    python -m pab.train --out pab/weights/opensora-v1.2-small --vae-minutes 5 --dit-minutes 15   # one H200, ~20 min
    python -m pab.train --model latte-1-small --out pab/weights/latte-1-small --vae-minutes 2 --dit-minutes 6
    python -m pab.train --device cpu --vae-steps 3 --dit-steps 3 --batch 2 --out /tmp/ckpt  # a smoke run

`--work` keeps the resumable states (weights, optimizer, EMA, step); `--resume` continues from them up to
the step targets (without it, a `--work` that holds a state of the stages asked for is refused, not
overwritten). `--out` receives the checkpoint layout that `pab generate --checkpoint` and the shipped
weights use. Each stage stops at its step target or its time budget (`--vae-minutes`, `--dit-minutes`),
whichever comes first, and prints loss and throughput as it goes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pab.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opensora-v1.2-small", help="the -small model to train")
    p.add_argument("--stage", choices=["vae", "dit", "all"], default="all")
    p.add_argument("--out", type=Path, help="checkpoint folder to write (default: WORK/checkpoint)")
    p.add_argument("--work", type=Path, help="resumable training state (default: runs/MODEL)")
    p.add_argument("--resume", action="store_true", help="continue from the states in --work")
    p.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=20_000)
    p.add_argument("--vae-minutes", type=float, help="time budget of the VAE stage")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-eval-clips", type=int, default=256,
                   help="clips that calibrate the latents (a quarter of them measure the round-trip PSNR)")
    p.add_argument("--vae-init", type=Path, help="a vae/ folder (or a checkpoint with one) to start the VAE from")
    p.add_argument("--dit-steps", type=int, default=100_000)
    p.add_argument("--dit-minutes", type=float, help="time budget of the DiT stage")
    p.add_argument("--batch", type=int, default=128, help="DiT clips per step")
    p.add_argument("--lr", type=float, default=4e-4, help="DiT and T5 learning rate")
    p.add_argument("--dit-init", type=Path, help="a checkpoint folder whose transformer/ and text_encoder/ "
                   "the DiT stage starts from (to continue in another session; pass another --seed for new batches)")
    p.add_argument("--ema", type=float, default=0.995, help="decay of the exported weights' moving average")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=1000)
    args = p.parse_args(argv)

    from pab.train import get_recipe, stages
    from pab.train.common import StageConfig

    try:
        recipe = get_recipe(args.model)
    except ValueError as e:
        print(f"pab.train: error: {e}", file=sys.stderr)
        return 2
    for name in ("vae_steps", "dit_steps", "vae_batch", "vae_eval_clips", "batch", "log_every", "save_every"):
        if getattr(args, name) < 1:
            print(f"pab.train: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.work = args.work or Path("runs") / args.model
    out = args.out or args.work / "checkpoint"
    # The states this run would write: an earlier run's are continued (--resume) or kept, never overwritten.
    states = [stages.state_file(args.work, stage) for stage in ("vae", "dit") if args.stage in (stage, "all")]
    found = [f for f in states if f.is_file()]
    if found and not args.resume:
        print(f"pab.train: error: {args.work} holds the state of an earlier run ({', '.join(f.name for f in found)}); "
              "pass --resume to continue it, or another --work (or delete the files) to start over", file=sys.stderr)
        return 2
    if args.resume and not found:
        print(f"pab.train: nothing to resume in {args.work} (no {' or '.join(f.name for f in states)}): starting "
              "from step 0", file=sys.stderr)
    args.work.mkdir(parents=True, exist_ok=True)
    common = dict(seed=args.seed, log_every=args.log_every, save_every=args.save_every, resume=args.resume)
    print(f"pab.train: {args.model} stage {args.stage} on {device}, state in {args.work}, checkpoint to {out}",
          flush=True)  # fmt: skip
    if args.stage in ("vae", "all"):
        cfg = StageConfig(args.vae_steps, args.vae_batch, args.vae_lr, args.vae_minutes, init=args.vae_init,
                          eval_clips=args.vae_eval_clips, **common)
        stages.train_vae(recipe, cfg, args.work, out, device)
    if args.stage in ("dit", "all"):
        cfg = StageConfig(args.dit_steps, args.batch, args.lr, args.dit_minutes, ema=args.ema,
                          init=args.dit_init, **common)
        stages.train_dit(recipe, cfg, args.work, out, device)
    print(f"pab.train: done; generate with: pab generate --model {args.model} --checkpoint {out} --prompt ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
