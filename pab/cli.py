"""The `pab` command: generate a video, list models, serve over HTTP, submit bulk renders."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from pab.request import add_options, from_options

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2, nothing written."""


# ----------------------------------------------------------------------------------------------------
# pab generate
# ----------------------------------------------------------------------------------------------------


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="render one video from a prompt", description="Render one video from a prompt."
    )
    p.add_argument("--model", default="opensora-v1.2-tiny", help="model name (see `pab models`)")
    p.add_argument("--prompt", required=True)
    # The per-video settings (pab.request); seed 0 unless given: the same command makes the same video.
    add_options(p, helps={"seed": "the noise's seed (default: 0)"}, seed=0)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--dtype", choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                   help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--checkpoint", help="the published weights: a folder or a Hugging Face repo id read from the "
                                        "local cache (README 'Checkpoints')")
    p.add_argument("--vae", help="the VAE's own source, e.g. hpcai-tech/OpenSora-VAE-v1.2 (default: the checkpoint's)")
    p.add_argument("--text-encoder", help="the text encoder's own source, e.g. DeepFloyd/t5-v1_1-xxl")
    p.add_argument("--sp", type=int, default=1, metavar="N", help="processes (one per GPU) for one video, its "
                   "tokens split over them; with --cfg-parallel, two halves of N/2, each splitting the tokens over "
                   "its N/2")
    p.add_argument("--cfg-parallel", action="store_true", help="the conditional and unconditional halves of CFG "
                   "on the two halves of the --sp processes (--sp 2: no token split, each process one half)")
    p.add_argument("--output", default="out.mp4", help="mp4 path; a JSON sidecar is written next to it")
    p.add_argument("--save-latents", help="also write the final latents (key 'latents') to this .safetensors")
    p.add_argument("--strip", help="also write a PNG of every 4th frame side by side (a look without a player)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_writable(path: Path) -> None:
    """Before any work: a path whose file can be written (a render takes minutes to find out otherwise)."""
    if path.is_dir():
        raise UsageError(f"{path} is a folder: give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():  # a file where a folder of the path should be: say which (mkdir says "File exists")
        raise UsageError(f"cannot write to {path}: {existing} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".pab-write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to {path}: {e.strerror or e}") from e


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` next to `path`, then rename: a failure never leaves a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _run_generate(rank: int, world: int, args: argparse.Namespace) -> dict | None:
    """Runs in each process of the group (or alone); rank 0 returns the sidecar."""
    import torch

    if args.quiet:  # transformers draws its own bar while the text encoder's weights load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    from pab.pipeline import GenerationRequest, Pipeline

    parallel = None
    if world > 1:
        from pab.parallel import ParallelConfig, init_parallel

        cfg = 2 if args.cfg_parallel else 1
        parallel = init_parallel(ParallelConfig(sp=world // cfg, cfg=cfg))
    device = args.device
    if device == "cuda" and world > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    pipe = Pipeline.from_name(
        args.model, device=device, dtype=args.dtype, checkpoint=args.checkpoint, parallel=parallel, vae=args.vae,
        text_encoder=args.text_encoder,
    )
    request = GenerationRequest(model=args.model, prompt=args.prompt, **args.settings.engine_fields())
    resolved = pipe.resolve(request)
    if rank == 0:
        for notice in pipe.notices(resolved):  # before the render, so a wrong size can be stopped early
            print(f"note: {notice}", file=sys.stderr)
    bar = None

    def progress(done: int, total: int) -> None:  # the total is the sampler's number of model calls
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
        bar.update(1)

    out = Path(args.output)
    # Rank 0 encodes the frames on a thread as the VAE decodes them; the file appears complete or not at all.
    writer = None
    if rank == 0:
        from pab.video import Mp4Writer

        writer = Mp4Writer(out, resolved.fps, background=True)
    try:
        result = pipe.generate(resolved, progress=progress if rank == 0 and not args.quiet else None,
                               frame_sink=writer.write if writer is not None else None)  # fmt: skip
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if bar is not None:
        bar.close()
    if rank != 0:
        return None
    t0 = time.perf_counter()
    writer.close()  # waits for the frames of the last decoded chunk only
    result.timings["encode_s"] = time.perf_counter() - t0
    sidecar = result.sidecar()
    sidecar["checkpoint"] = args.checkpoint
    if args.vae or args.text_encoder:
        sidecar["weights"] = {"vae": args.vae, "text_encoder": args.text_encoder}
    sidecar["device"] = str(pipe.device)
    sidecar["dtype"] = str(pipe.dtype).removeprefix("torch.")
    if args.strip:
        from pab.video import write_strip

        _atomic_write(Path(args.strip), lambda tmp: write_strip(tmp, result.frames))
    if args.save_latents:
        from safetensors.torch import save_file

        latents = {"latents": result.latents.contiguous()}
        _atomic_write(Path(args.save_latents), lambda tmp: save_file(latents, str(tmp)))
    text = json.dumps(sidecar, indent=2) + "\n"
    _atomic_write(out.with_suffix(".json"), lambda tmp: tmp.write_text(text))
    return sidecar


def cmd_generate(args: argparse.Namespace) -> int:
    from pab.models import get_spec

    try:
        get_spec(args.model)
    except ValueError as e:
        raise UsageError(str(e)) from e
    try:
        args.settings = from_options(args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.sp < 1:
        raise UsageError(f"--sp must be >= 1, got {args.sp}")
    if args.cfg_parallel and args.sp % 2:
        raise UsageError("--cfg-parallel needs an even number of processes (--sp 2, 4, ...)")
    _check_device(args.device, args.sp)
    out = Path(args.output)
    if out.suffix.lower() != ".mp4":
        raise UsageError(f"--output must end in .mp4, got {args.output}")
    _check_writable(out)
    if args.save_latents:
        _check_writable(Path(args.save_latents))
    if args.strip:
        if Path(args.strip).suffix.lower() != ".png":
            raise UsageError(f"--strip must end in .png, got {args.strip}")
        _check_writable(Path(args.strip))
    # Validate the request before loading weights or starting processes, so bad input fails fast.
    if not _validate_request_early(args):
        from pab.models import split_name

        if split_name(args.model)[1] == "full":  # said before minutes of building tens of GB of random weights
            print(f"pab: warning: {args.model} has no --checkpoint: every part gets RANDOM weights (the video is "
                  "noise), and a full-size model needs tens of GB of memory and, on the CPU, a long time; pass "
                  "--checkpoint, or try a -small model (pab models lists them)", file=sys.stderr)  # fmt: skip
    t0 = time.perf_counter()
    if args.sp == 1:
        sidecar = _run_generate(0, 1, args)
    else:
        from pab.parallel import launch_local

        sidecar = launch_local(args.sp, _run_generate, args)[0]
    wall = time.perf_counter() - t0
    if sidecar["random_weights"]:
        weights = "RANDOM weights (no --checkpoint): the video is noise-like"
    elif args.checkpoint is None:  # a -small model's shipped weights
        from pab.models import shipped_checkpoint, training_summary

        folder = shipped_checkpoint(args.model)
        weights = f"the weights trained here ({folder}): {training_summary(folder)}"
    else:
        weights = f"the weights in {args.checkpoint}" + "".join(
            f", {part} from {src}" for part, src in (("VAE", args.vae), ("text encoder", args.text_encoder)) if src)
    print(
        f"wrote {args.output} ({sidecar['num_frames']} frames, {sidecar['width']}x{sidecar['height']}, "
        f"{sidecar['fps']} fps) and {Path(args.output).with_suffix('.json')} in {wall:.1f}s; "
        f"model {args.model} with {weights}"
    )
    stats = sidecar["pab"]["stats"]
    print("pab: " + ", ".join(f"{k} {v['computed']} computed / {v['broadcast']} broadcast" for k, v in stats.items()))
    if sidecar["cache"]["stats"]:
        steps = sidecar["cache"]["stats"]
        print(f"cache {sidecar['cache']['policy']['name']}: {steps['computed']} steps computed, {steps['reused']} "
              f"reused {steps['reused_steps']}")
    return 0


def _check_device(device: str | None, processes: int) -> None:
    """A CUDA device that this machine has (a traceback from deep in the model otherwise)."""
    if not device or not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UsageError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__} sees none); "
                         "use --device cpu, or leave --device out")
    if processes > count:
        raise UsageError(f"--device {device} --sp {processes}: a process per GPU, and this machine has {count}")


def _validate_request_early(args: argparse.Namespace) -> bool:
    """Cheap checks with the model's rules, without building the model. True if weights were found to load."""
    from pab.caching import load_calibration, resolve_cache
    from pab.checkpoint import resolve_sources
    from pab.errors import about
    from pab.pipeline import GenerationRequest

    try:  # finds every part's folder (locally or in the Hugging Face cache) without loading anything
        sources = resolve_sources(args.model, args.checkpoint, vae=args.vae, text_encoder=args.text_encoder)
        fields = args.settings.engine_fields()
        spec = GenerationRequest(model=args.model, prompt=args.prompt, **fields).cache_spec()
        calibration = load_calibration(sources.calibration if sources else None)
        with about("cache"):
            resolve_cache(args.model, spec, calibration)
    except ValueError as e:
        raise UsageError(_with_option(e, args)) from e
    return sources is not None


# ----------------------------------------------------------------------------------------------------
# pab models
# ----------------------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from pab.broadcast import PABConfig
    from pab.models import MODEL_SPECS, WEIGHTS_DIR, sized_name

    def weights(name: str, size: str) -> str:
        if size == "small":  # trained here: shipped, or not trained yet
            return "shipped" if (WEIGHTS_DIR / name / "transformer").is_dir() else "train first"
        return "random" if size == "tiny" else "--checkpoint"

    def presets(name: str) -> str:
        """off, paper, and the step-reuse presets `--cache` takes: TeaCache's published ones for a full size, those
        calibrated beside the weights here (shipped for -small)."""
        from pab.caching import cache_names, load_calibration
        from pab.checkpoint import resolve_sources

        try:
            sources = resolve_sources(name, None)
            calibration = load_calibration(sources.calibration if sources else None)
        except ValueError:  # no weights here, or a calibration file that cannot be read
            calibration = None
        return ", ".join(cache_names(name, calibration))

    rows: list[dict[str, Any]] = []
    for name, spec in MODEL_SPECS.items():
        for size in spec.sizes:
            d = spec.defaults_for(size)
            full_name = sized_name(name, size)
            rows.append(
                {
                    "name": full_name,
                    "size": size,
                    "sampler": spec.sampler,
                    "defaults": (
                        f"{d.num_frames}f {d.width}x{d.height} {d.fps}fps {d.steps} steps cfg {d.guidance_scale}"
                    ),
                    "weights": weights(full_name, size),
                    "presets": presets(full_name),
                }
            )
    if args.json:
        out = {r["name"]: {**r, "paper_preset": PABConfig.preset(r["name"], "paper").to_dict()} for r in rows}
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'model':<26} {'size':<5} {'sampler':<7} {'defaults':<40} {'weights':<12} cache presets")
    for r in rows:
        print(f"{r['name']:<26} {r['size']:<5} {r['sampler']:<7} {r['defaults']:<40} {r['weights']:<12} "
              f"{r['presets']}")
    print("\nweights: shipped = trained here, in pab/weights; train first = `python -m pab.train --model NAME` (or "
          "--checkpoint); --checkpoint = the published files (random without); random = test size")
    print("\npaper presets (range, window):")
    for name in MODEL_SPECS:
        cfg = PABConfig.preset(name, "paper").to_dict()
        print(f"  {name}: " + "; ".join(f"{k} {v['range']} {tuple(v['window'])}" for k, v in cfg.items() if v))
    return 0


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------


# Subcommands other packages provide, found through the "pab.commands" entry points (pyproject.toml), so this
# package never imports the layers above it by name: `pab serve` is cluster's, `pab bulk` is jobs'.
COMMANDS = "pab.commands"
COMMAND_HELP = {
    "serve": "start the HTTP service locally (see `pab serve --help`)",
    "bulk": "bulk rendering from Parquet manifests (see `pab bulk --help`)",
    "calibrate": "measure and write step-reuse presets (see `pab calibrate --help`)",
}


def plugin_commands() -> dict[str, Any]:
    """name -> entry point of every subcommand registered under "pab.commands" by an installed package."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=COMMANDS)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = plugin_commands()
    if argv and argv[0] in plugins:  # they parse their own arguments
        return plugins[argv[0]].load()(argv[1:])
    if argv and argv[0] in COMMAND_HELP:
        print(f"pab: error: `pab {argv[0]}` is provided by an installed package, and none registered it; install "
              "the project (`pip install -e .`, or ./run.sh) so its pab.commands entry points exist",
              file=sys.stderr)  # fmt: skip
        return EXIT_BAD_INPUT
    parser = argparse.ArgumentParser(prog="pab", description="Video DiTs with Pyramid Attention Broadcast.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    m = sub.add_parser("models", help="list models, sizes and PAB presets")
    m.add_argument("--json", action="store_true")
    for name in sorted(plugins):
        sub.add_parser(name, help=COMMAND_HELP.get(name, f"see `pab {name} --help`"))
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_models(args)
    except UsageError as e:
        print(f"pab: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as e:  # request validation inside the pipeline (sizes, frame counts, checkpoints)
        print(f"pab: error: {_with_option(e, args)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C: no traceback; the mp4 is written whole or not at all (`_atomic_write`)
        print("pab: interrupted", file=sys.stderr)
        return 130


def _with_option(e: ValueError, args: argparse.Namespace) -> str:
    """The message, led by the option it is about where the engine names its field (a RequestError)."""
    field = getattr(e, "field", "")
    if not field:
        return str(e)
    top, _, rest = field.partition(".")
    if top == "cache" and getattr(args, "cache", None) is None and getattr(args, "pab", None) is not None:
        top = "pab"  # one setting under two options: name the one given
    return f"--{top.replace('_', '-')}{' ' + rest if rest else ''}: {e}"


if __name__ == "__main__":
    sys.exit(main())
