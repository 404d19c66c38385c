"""Text-to-video: prompt -> T5 -> denoising loop (with PAB) -> VAE decode -> frames.

One `Pipeline` holds one model's parts and serves any number of generations, one at a time; all
per-generation state (PAB caches, sampler state, RNG) lives inside `generate`, so back-to-back or
interleaved requests never see each other's state. Under dynamic sequence parallelism every rank of a
group builds the same pipeline with a `ParallelContext` and calls `generate` with the same request.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from pab.broadcast import PABConfig, PABState, apply_pab, use_state
from pab.caching import CachePolicy, load_calibration, resolve_cache
from pab.checkpoint import WeightSources, resolve_sources
from pab.engine import EngineOptions
from pab.errors import GenerationCancelled, RequestError, about
from pab.seeds import draw_seed
from pab.families import get_family
from pab.models import (
    MODEL_SPECS, CheckpointError, ModelSpec, build, get_spec, randomize_weights, sized_name, split_name,
)  # fmt: skip
from pab.models.vae import VideoVAE
from pab.models.packing import pack_joint_linears
from pab.precision import Fp8Config, PrecisionState, apply_fp8, check_precision, fp8_capable, use_precision
from pab.stepcache import StepCacheState, apply_step_cache, use_step_state

log = logging.getLogger(__name__)

TEXT_CACHE_SIZE = 16  # encoded prompts a pipeline keeps (Pipeline.encode_text)
PATCH = 2  # every transformer here cuts the latents into 2x2 patches
ProgressFn = Callable[[int, int], None]


@dataclass
class GenerationRequest:
    """One video to make. Fields left None take the model's defaults (`pab models` lists them)."""

    model: str
    prompt: str
    negative_prompt: str = ""
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    pab: str | dict[str, Any] | None = "off"
    cache: str | dict[str, Any] | None = None  # off | paper | a calibrated preset | rules or a policy (pab.caching)
    precision: str | None = None  # bf16 (the pipeline's dtype) | fp8 (pab.precision); None: bf16

    def cache_spec(self) -> str | dict[str, Any] | None:
        """The cache asked for: `cache`, or `pab` (its older name); a RequestError when both ask for different ones."""
        if self.cache is None:
            return self.pab
        if self.pab not in (None, "off") and self.pab != self.cache:
            raise RequestError("cache", f"cache {self.cache!r} and pab {self.pab!r} disagree; give one (pab is "
                               "cache's old name)")  # fmt: skip
        return self.cache

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    """What a generation produced. `frames` is None on ranks other than 0 of a parallel group."""

    request: GenerationRequest
    frames: np.ndarray | None  # (F, H, W, 3) uint8
    latents: torch.Tensor  # (1, C, T, h, w) final denoised latents, float32, on CPU
    timesteps: list[float]
    pab: dict[str, Any]
    pab_stats: dict[str, dict[str, int]]
    timings: dict[str, float]
    random_weights: bool
    parallel: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # the resolved policy (CachePolicy.to_dict)
    cache_stats: dict[str, Any] = field(default_factory=dict)  # steps computed / reused (step reuse)
    precision: dict[str, Any] = field(default_factory=dict)  # what ran: pab.precision.PrecisionState.to_dict()
    size: tuple[int, int] | None = None  # (height, width) of the frames; None = the request's
    notices: list[str] = field(default_factory=list)  # where the video differs from the request, and why

    def sidecar(self) -> dict[str, Any]:
        """The JSON written next to the video: `height` and `width` are the video's, `request` what was asked."""
        height, width = self.size or (self.request.height, self.request.width)
        return {
            "request": self.request.to_dict(),
            "model": self.request.model,
            "seed": self.request.seed,
            "num_frames": self.request.num_frames,
            "height": height,
            "width": width,
            "fps": self.request.fps,
            "notices": self.notices,
            "timesteps": self.timesteps,
            # The shape GPU groups write too (actors.worker): the settings that ran, and what they did.
            "pab": {"settings": self.pab, "stats": self.pab_stats},
            "cache": {"policy": self.cache, "stats": self.cache_stats},
            "precision": self.precision,
            "timings": self.timings,
            "random_weights": self.random_weights,
            "parallel": self.parallel,
        }


def rendered_size(vae: Any, height: int, width: int) -> tuple[int, int]:
    """(height, width) of the frames a model renders for a request: each side rounded down to whole patches.

    The latents are the pixels over the VAE's factor, cut into 2x2 patches, so a side covers a multiple of
    factor x 2 pixels (16 for most models here). Rounding down as the official pipelines do keeps their
    latents, and never renders more pixels than the request was admitted for.
    """
    m = vae.spatial_factor * PATCH
    return height // m * m, width // m * m


def size_notices(model: str, vae: Any, r: GenerationRequest) -> list[str]:
    """What a user must be told about the size of a resolved request: [] when it renders exactly as asked."""
    height, width = rendered_size(vae, r.height, r.width)
    off = [f"width {r.width}"] if width != r.width else []
    off += [f"height {r.height}"] if height != r.height else []
    if not off:
        return []
    m = vae.spatial_factor * PATCH
    return [
        f"{' and '.join(off)} {'is' if len(off) == 1 else 'are'} not a multiple of {m}: {model} renders whole "
        f"{m}-pixel patches ({vae.spatial_factor}x VAE, {PATCH}x{PATCH} latent patches), so the video is "
        f"{width}x{height} (width x height, rounded down); sizes in multiples of {m} render exactly"
    ]


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def load_transformer(spec: ModelSpec, size: str, folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The transformer from `folder` (config.json optional: the size's config).

    A checkpoint whose config is exactly another registered model's (another size, or another family) is refused
    with the name that fits: the text encoder and the defaults come from the name, and a mismatch failed
    mid-render with a shape error, or while parsing the config with advice meant for Python callers.
    """
    fits = _registered_model(folder / "config.json")
    if fits is not None and fits != sized_name(spec.name, size):
        raise CheckpointError(f"{folder} holds the transformer of {fits}, not of {sized_name(spec.name, size)}: "
                              f"run with --model {fits}")
    model = spec.transformer.load(size, folder, device)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def _registered_model(config_file: Path) -> str | None:
    """The registered model and size whose transformer config equals `config_file`'s, or None (no file, or a
    config of its own: a fine-tune of another shape loads as the name says)."""
    if not config_file.is_file():
        return None
    for spec in MODEL_SPECS.values():
        try:
            found = spec.transformer.config("full", config_file)
        except (TypeError, ValueError, KeyError):
            continue  # another family's config; the loader says what is wrong with a broken file
        match = next((s for s in spec.sizes if spec.transformer.config(s) == found), None)
        if match is not None:
            return sized_name(spec.name, match)
    return None


def load_text_encoder(
    spec: ModelSpec, size: str, sources: WeightSources | None, device: torch.device, dtype: torch.dtype
):  # fmt: skip
    from pab.text import TextEncoder

    max_length = spec.text_max_length_for(size)
    if sources is not None:
        return TextEncoder.from_pretrained(sources.text_encoder, max_length=max_length, device=device, dtype=dtype,
                                           tokenizer_path=sources.tokenizer)  # fmt: skip
    if size == "tiny":  # float32 whatever the pipeline's dtype, as it always was
        return TextEncoder.random("tiny", max_length=max_length, seed=0, device=device)
    return TextEncoder.random("xxl", max_length=max_length, seed=0, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------


def checked_fields(request: GenerationRequest) -> GenerationRequest:
    """The request with its fields checked against the one schema (`pab.request.VideoSettings`) and taken as it
    reads them ("4" steps is 4): the command line and HTTP check at their edge, and a request built in Python
    failed deep in the sampler ("'<' not supported", "argument 'size' failed to unpack"). Cache names and
    .json paths are `resolve_cache`'s to judge; precision modes are `check_precision`'s."""
    from pydantic import ValidationError

    from pab.request import VideoSettings, request_error

    if not isinstance(request.prompt, str) or not isinstance(request.negative_prompt, str):
        field = "prompt" if not isinstance(request.prompt, str) else "negative_prompt"
        raise RequestError(field, f"{field} must be a string, got {type(getattr(request, field)).__name__}")
    skip = {"precision", "cache", "pab"}
    fields = {k: getattr(request, k) for k in VideoSettings.model_fields if k not in skip}
    caches = {k: v for k in ("cache", "pab") if not isinstance(v := getattr(request, k), str | PABConfig)}
    try:
        settings = VideoSettings.model_validate({**fields, **caches})
    except ValidationError as e:
        raise request_error(e) from None
    return replace(request, **{k: getattr(settings, k) for k in fields})


def resolve_request(
    request: GenerationRequest, vae: Any, calibration: dict[str, Any] | None = None
) -> GenerationRequest:
    """The request with the model's defaults filled in, or a RequestError saying what the model can take and
    which field it is about.

    Needs no weights: `vae` only answers which frame counts it takes (`latent_frames`), so the HTTP ingress
    runs the same checks with a VAE on the meta device. `height` and `width` stay as asked: the model and the
    sampler are conditioned on them, as in the official pipelines; the video itself is `rendered_size` (whole
    patches), and `size_notices` says so.
    """
    request = checked_fields(request)
    name = request.model
    with about("model"):
        spec, family, size = get_spec(name), get_family(name), split_name(name)[1]
    d = spec.defaults_for(size)
    with about("precision"):
        precision = check_precision(request.precision or "bf16")
    r = replace(
        request,
        num_frames=request.num_frames if request.num_frames is not None else d.num_frames,
        height=request.height if request.height is not None else d.height,
        width=request.width if request.width is not None else d.width,
        fps=request.fps if request.fps is not None else d.fps,
        steps=request.steps if request.steps is not None else d.steps,
        guidance_scale=request.guidance_scale if request.guidance_scale is not None else d.guidance_scale,
        seed=request.seed if request.seed is not None else draw_seed(),
        precision=precision,
    )
    if not r.prompt or not r.prompt.strip():
        raise RequestError("prompt", "prompt must not be empty")
    # The fields' ranges are the schema's (checked_fields); the defaults filled in here keep them.
    with about("num_frames"):
        vae.latent_frames(r.num_frames)  # raises ValueError naming the frame counts it can take
    # Open-Sora's timestep shift is undefined for 2-16 frames, PNDM needs 4 steps: the sampler says so, and about
    # which field (a RequestError).
    family.new_sampler(size, r.steps, height=r.height, width=r.width, num_frames=r.num_frames)
    cache = r.cache_spec()  # a RequestError when cache and pab disagree
    with about("cache"):  # unknown names, malformed rules (their own path under "cache"), blocks the model lacks
        resolve_cache(name, cache, calibration)
    return r


class Pipeline:
    """A loaded text-to-video model. Not thread-safe: run one generation at a time per instance."""

    def __init__(
        self,
        name: str,
        transformer: nn.Module,
        text_encoder: Any,
        vae: VideoVAE,
        device: torch.device,
        dtype: torch.dtype,
        random_weights: bool,
        parallel: Any = None,
        calibration: dict[str, Any] | None = None,
        engine: EngineOptions | None = None,
    ) -> None:
        self.name = name
        self.engine = engine = engine or EngineOptions()
        self.calibration = calibration  # `pab calibrate`'s numbers for step reuse (None: none beside the weights)
        self.family = get_family(name)
        self.spec = self.family.spec
        self.size = split_name(name)[1]
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.random_weights = random_weights
        self.parallel = parallel
        # Linears a model runs as one GEMM (Latte's q, k, v) laid end to end, now that the weights are on their
        # device and dtype: the GEMM reads a view of them instead of a copy made each call (pab.models.packing).
        pack_joint_linears(transformer)
        if parallel is not None:
            from pab.parallel import parallelize_model

            # Sequence parallelism first, PAB after: the PAB hook must wrap the all-to-all so a
            # broadcast attention skips its communication too.
            parallelize_model(transformer, parallel)
        if engine.compile:
            from pab.compile import apply_compile

            # Innermost: compiles each attention's own math; DSP and PAB logic stays in eager Python.
            apply_compile(transformer)
        self.graphs = None
        if engine.cuda_graphs:
            from pab.cudagraph import apply_cuda_graphs

            # Outermost, on the transformer itself: one replay per step; PAB re-applied later is detected.
            self.graphs = apply_cuda_graphs(transformer, backend="cuda" if device.type == "cuda" else "eager")
        self.vae_kernels = None
        if engine.vae_kernels:
            from pab.vae_kernels import apply_vae_kernels

            # The VAE's GroupNorms (+ SiLU) as Triton kernels reading channels-last in place, conv biases folded,
            # subpixel upsamplers (CUDA, half precision; elsewhere the hooks run PyTorch's modules). On by default:
            # 1.65 -> 0.54 s at 480p on an H100.
            self.vae_kernels = apply_vae_kernels(vae, channels_last=device.type == "cuda")
        # Hooks are attached once; an empty config per request keeps them counting only.
        self._pab_handles: dict[str, Any] = {}
        self._step_handle: Any = None
        self._fp8: Any = None  # pab.precision.Fp8Handle, made by the first fp8 request
        # Encoded text by (prompt, negative prompt), newest last: a bulk job's seeds of one prompt and a row's
        # retries on this group encode it once. At most TEXT_CACHE_SIZE entries (~5 MB each at T5-XXL's 300 tokens).
        self._texts: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        # Where fp8 requests use fp8 (pab.precision): the family's choice (`Family.fp8`). Set before the first fp8
        # request: which linears are quantised is fixed then; the per-request fields (the q, k, v groups, bf16
        # first/last steps, fast accumulation) apply per request.
        self.fp8_config: Fp8Config = self.family.fp8

    @classmethod
    def from_name(
        cls,
        name: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        checkpoint: str | Path | None = None,
        parallel: Any = None,
        vae: str | Path | None = None,
        text_encoder: str | Path | None = None,
        engine: EngineOptions | None = None,
    ) -> "Pipeline":
        """Build every part of model `name`: random weights unless `checkpoint` holds the published files;
        a `-small` model loads its shipped weights (pab/weights/NAME) when no checkpoint is given.

        `checkpoint`, `vae` and `text_encoder` are sources as `pab.checkpoint` reads them: a folder, or a
        Hugging Face repository id in the local cache; `vae` and `text_encoder` replace those parts.
        `engine` turns on the engine's switches (`pab.engine.EngineOptions`: compile, CUDA graphs, VAE kernels).
        """
        spec = get_spec(name)
        size = split_name(name)[1]
        dev = torch.device(device) if device is not None else default_device()
        dt = resolve_dtype(dtype, dev)
        # A `-tiny` name with a checkpoint loads tiny weights saved in the same layout (tests).
        sources = resolve_sources(name, checkpoint, vae=vae, text_encoder=text_encoder)
        if sources is not None:
            transformer = load_transformer(spec, size, sources.transformer, dev, dt)
        else:
            transformer = build(name, device=dev, seed=0)
            randomize_weights(transformer, seed=0)
            transformer = transformer.to(dtype=dt)
        text_encoder_ = load_text_encoder(spec, size, sources, dev, dt)
        vae_ = get_family(name).load_vae(size, sources.vae if sources else None, dev, dt)
        return cls(
            name,
            transformer,
            text_encoder_,
            vae_,
            dev,
            dt,
            random_weights=sources is None,
            parallel=parallel,
            calibration=load_calibration(sources.calibration if sources else None),
            engine=engine,
        )

    # ------------------------------------------------------------------ validation

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """Fill defaults and check that the model can take the request (`resolve_request`)."""
        if request.model != self.name:
            raise RequestError("model", f"this pipeline serves {self.name!r}, not {request.model!r}")
        r = resolve_request(request, self.vae, self.calibration)
        if r.precision == "fp8":
            ok, why = fp8_capable(self.device)
            if not ok:  # e.g. an A100: refused before any work, saying what to ask for instead
                raise RequestError("precision", why)
        return r

    def output_size(self, r: GenerationRequest) -> tuple[int, int]:
        """(height, width) of the video this pipeline renders for a resolved request (`rendered_size`)."""
        return rendered_size(self.vae, r.height, r.width)

    def notices(self, r: GenerationRequest) -> list[str]:
        """Where the video of a resolved request differs from it, and why ([] if nowhere): its size, a prompt
        longer than the text encoder reads (cut there, as the official pipelines cut it), and a calibrated
        threshold preset run at another step count than it was calibrated at."""
        out = size_notices(self.name, self.vae, r) + self._preset_notices(r)
        enc = self.text_encoder
        if not hasattr(enc, "token_count"):  # a stand-in encoder (tests, benchmarks): nothing to count with
            return out
        suffix = self.spec.prompt_suffix
        for name, text in (("prompt" + (f" with {suffix.strip()!r} appended" if suffix else ""), r.prompt + suffix),
                           ("negative prompt", r.negative_prompt)):  # fmt: skip
            n = enc.token_count(text) if text else 0
            if n > enc.max_length:
                out.append(f"the {name} is {n} text tokens and {self.name} reads the first {enc.max_length}: the "
                           "words past them did not shape the video")
        return out

    def _preset_notices(self, r: GenerationRequest) -> list[str]:
        """A teacache/magcache preset's threshold bounds an error summed over the steps, so at another step count
        it reuses another share of them (a fixed schedule is rescaled; it needs no notice)."""
        spec = r.cache_spec()
        cal = self.calibration or {}
        preset = (cal.get("presets") or {}).get(spec) if isinstance(spec, str) else None
        steps = cal.get("steps")
        if not isinstance(preset, dict) or preset.get("policy") == "fixed" or not steps or r.steps == steps:
            return []
        return [f"the cache preset {spec!r} was calibrated at {steps} steps; at {r.steps} its threshold reuses "
                f"another share of the steps than `pab models` lists (`pab calibrate --steps {r.steps}` makes "
                "presets for that count)"]

    def latent_shape(self, r: GenerationRequest) -> tuple[int, int, int, int, int]:
        """(1, C, T, h, w): the output size over the VAE's spatial factor."""
        f = self.vae.spatial_factor
        height, width = self.output_size(r)
        return (1, self.vae.latent_channels, self.vae.latent_frames(r.num_frames), height // f, width // f)

    # ------------------------------------------------------------------ generation

    def _pab_handle(self, config: PABConfig):
        key = json.dumps(config.to_dict(), sort_keys=True)
        # Attached again if a caller took the hooks off the transformer (remove_pab), or the request would run
        # without PAB and still be reported as using it.
        if key not in self._pab_handles or not self._pab_handles[key].attached():
            from pab.broadcast import remove_pab

            remove_pab(self.transformer)
            self._pab_handles = {key: apply_pab(self.transformer, config)}
        return self._pab_handles[key]

    @torch.no_grad()
    def encode_text(self, r: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditional and unconditional text for one forward of batch 2 ([cond, uncond]); a prompt seen lately is
        not encoded again (the tensors are only read, so every request may share them). Replacing the text encoder
        or the transformer starts afresh; after changing their weights in place, call `clear_text_cache()`."""
        key = (r.prompt + self.spec.prompt_suffix, r.negative_prompt, id(self.text_encoder), id(self.transformer))
        if key in self._texts:
            self._texts.move_to_end(key)
            return self._texts[key]
        text = self.family.text(self.text_encoder, self.transformer, key[0], key[1], self.dtype)
        self._texts[key] = text
        while len(self._texts) > TEXT_CACHE_SIZE:
            self._texts.popitem(last=False)
        return text

    def clear_text_cache(self) -> None:
        """Forget every encoded prompt (`encode_text`), e.g. after loading other weights into this pipeline."""
        self._texts.clear()

    def _forward(self, z2: torch.Tensor, t: float, y: torch.Tensor, mask: torch.Tensor | None, r: GenerationRequest):
        """One transformer call on the CFG batch; returns the model's prediction (first 4 channels)."""
        tt = torch.full((z2.shape[0],), t, device=z2.device, dtype=torch.float32)
        return self.family.forward(self.transformer, z2, tt, y, mask, r)[:, : z2.shape[1]]

    def _cfg_step(self, z: torch.Tensor, t: float, y, mask, r: GenerationRequest) -> torch.Tensor:
        ctx = self.parallel
        if ctx is not None and getattr(ctx, "cfg_size", 1) > 1:
            # CFG parallel: each sub-group computes one half; gather restores [cond, uncond].
            local = self._forward(
                z.to(self.dtype), t, ctx.split_cfg(y), None if mask is None else ctx.split_cfg(mask), r
            )
            pred = ctx.gather_cfg(local)
        else:
            pred = self._forward(torch.cat([z, z]).to(self.dtype), t, y, mask, r)
        cond, uncond = pred.float().chunk(2)
        return uncond + r.guidance_scale * (cond - uncond)

    @torch.no_grad()
    def generate(
        self,
        request: GenerationRequest,
        progress: ProgressFn | None = None,
        should_cancel: Callable[[], bool] | None = None,
        decode: bool = True,
        step_state: StepCacheState | None = None,
        frame_sink: Callable[[np.ndarray], None] | None = None,
        cancel_decode: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Make one video. `progress(done, total)` follows the model calls; `should_cancel()` is checked
        before each; `decode=False` stops at the latents (benchmarks of the DiT alone). `step_state` replaces
        the request's own step-reuse state and config, for a caller that measures the steps (`pab calibrate`).
        `frame_sink(frames)` gets the uint8 frames (f, H, W, 3) in order as the VAE decodes them (an encoder
        on another thread then works while the GPU decodes the rest); the result holds them all as well.
        `cancel_decode()` is checked before each piece of the decode: unlike `should_cancel` it must be a local
        check (rank 0 decodes alone, so a collective would wait for ranks that are done)."""
        from pab.video import to_uint8_frames_async

        r = self.resolve(request)
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        policy = resolve_cache(self.name, r.cache_spec(), self.calibration)
        pab_config = policy.pab
        self._pab_handle(pab_config)
        state = PABState()  # this request's caches and counters only
        if step_state is not None:
            policy = CachePolicy(f"{policy.name}+{step_state.config.policy}", policy.pab, step_state.config)
            step_state.agree = self._agree()
        else:
            step_state = StepCacheState(config=policy.step, agree=self._agree())
        if policy.step is not None and (self._step_handle is None or not self._step_handle.attached()):
            self._step_handle = apply_step_cache(self.transformer)  # inert for requests without step reuse
        if self.parallel is not None:
            self.parallel.stats.reset()  # communication is counted per generation
        if r.precision == "fp8" and self._fp8 is None:
            self._fp8 = apply_fp8(self.transformer, self.fp8_config)  # once per pipeline; inert for bf16 requests

        y, mask = self.encode_text(r)
        timings["text_s"] = time.perf_counter() - t_start

        shape = self.latent_shape(r)
        sampler = self.family.new_sampler(self.size, r.steps, height=r.height, width=r.width, num_frames=r.num_frames)
        gen = torch.Generator(device="cpu").manual_seed(int(r.seed))
        z = sampler.init_noise(shape, generator=gen, dtype=torch.float32, device=self.device)
        total = len(sampler.timesteps)
        # num_steps: the sampler's model calls (a multistep start may add some to r.steps)
        precision = PrecisionState(r.precision, num_steps=total, config=self._fp8_request_config(),
                                   reduce_max=self._agree(max_=True))  # fmt: skip
        t0 = time.perf_counter()
        a2a_skipped = a2a_last = 0
        # The profiler's name for the loop (bench.run --idle measures the GPU's idle share inside it).
        with use_state(state), use_step_state(step_state), use_precision(precision), \
                torch.profiler.record_function("pab.denoise"):
            for i, t in enumerate(sampler.timesteps):
                if should_cancel is not None and should_cancel():
                    raise GenerationCancelled(f"cancelled before step {i + 1} of {total}")
                state.begin_step(i, float(t))
                step_state.begin_step(i, total)
                precision.begin_step(i)
                done = self.parallel.stats.all_to_all_done if self.parallel is not None else 0
                pred = self._cfg_step(z, float(t), y, mask, r)
                if self.parallel is not None:  # a reused step skips the all-to-alls of the last computed one
                    if step_state.reused and step_state.reused[-1] == i:
                        a2a_skipped += a2a_last
                    else:
                        a2a_last = self.parallel.stats.all_to_all_done - done
                z = sampler.step(pred, i, z)
                if progress is not None:
                    progress(i + 1, total)
        self._sync()
        timings["denoise_s"] = time.perf_counter() - t0

        frames = None
        rank = getattr(self.parallel, "rank", 0) if self.parallel is not None else 0
        if rank == 0 and decode:
            t1 = time.perf_counter()
            # The frames stay at the size the latents cover (`output_size`); scaling them to the size asked
            # would only blur every frame, and hid the rounding (the notices report it instead).
            def take(ready: Callable[[], np.ndarray]) -> None:
                piece = ready()
                if frame_sink is not None:
                    frame_sink(piece)

            # Each piece's frames are taken once the next piece's decode is queued, so the GPU does not wait
            # on the host for their copy (to_uint8_frames_async). They land in one array: the host pins two
            # pieces at most, however long the video, and nothing is concatenated after the last piece. The
            # profiler's name for the decode: bench.run --decode-idle measures the GPU's idle share inside it.
            frames, done, pending = None, 0, None
            with torch.profiler.record_function("pab.decode"):
                for video in self.vae.decode_chunks(z.to(self.dtype), num_frames=r.num_frames):  # (1, 3, f, H', W')
                    if done >= r.num_frames:
                        break
                    if cancel_decode is not None and cancel_decode():  # a CPU decode of a large video takes minutes
                        raise GenerationCancelled(f"cancelled during the decode ({done} of {r.num_frames} frames)")
                    f = min(r.num_frames - done, video.shape[2])
                    if frames is None:
                        frames = np.empty((r.num_frames, *video.shape[3:], 3), np.uint8)  # (F, H', W', 3)
                    ready = to_uint8_frames_async(video[0, :, :f], out=frames[done : done + f])
                    done += f
                    if pending is not None:
                        take(pending)
                    pending = ready
                take(pending)
            frames = frames[:done]
            self._sync()
            timings["decode_s"] = time.perf_counter() - t1
        timings["total_s"] = time.perf_counter() - t_start
        parallel_info: dict[str, Any] = {}
        if self.parallel is not None:
            parallel_info = {"sp": getattr(self.parallel, "sp_size", 1), "cfg": getattr(self.parallel, "cfg_size", 1)}
            parallel_info["comm"] = self.parallel.stats.as_dict()
            parallel_info["comm"]["all_to_all_skipped_by_step_reuse"] = a2a_skipped
        return GenerationResult(
            request=r,
            frames=frames,
            latents=z.float().cpu(),
            timesteps=[float(t) for t in sampler.timesteps],
            pab=pab_config.to_dict(),
            pab_stats={k: dict(v) for k, v in state.stats.items()},
            cache=policy.to_dict(),
            cache_stats=step_state.stats if policy.step is not None else {},
            # "precision" is what the request asked for (bf16: no fp8); "dtype" what every other GEMM ran in (a
            # CPU pipeline's float32 too)
            precision={**precision.to_dict(), "dtype": str(self.dtype).removeprefix("torch.")},
            timings=timings,
            random_weights=self.random_weights,
            parallel=parallel_info,
            size=self.output_size(r),
            notices=self.notices(r),
        )

    def _fp8_request_config(self) -> Fp8Config:
        """`fp8_config`, with the output projections in bf16 where a request runs as CUDA graphs: their delayed
        scale picks its slots by the steps an attention ran at, and a replayed graph runs no Python to count them."""
        if self.fp8_config.attention_outputs and self.graphs is not None:
            return replace(self.fp8_config, attention_outputs=False)
        return self.fp8_config

    def _agree(self, max_: bool = False) -> Any:
        """Sum (or max) a tensor over this generation's group in place: every rank takes the same step-reuse
        decision, and scales its share of an attention's output as one device scales all of it (fp8)."""
        if self.parallel is None or getattr(self.parallel, "world_size", 1) == 1:
            return None
        import torch.distributed as dist

        op = dist.ReduceOp.MAX if max_ else dist.ReduceOp.SUM

        def agree(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t, op=op)  # the default group: the ranks of this generation group
            return t

        return agree

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """bf16 on GPU, float32 on CPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]
