"""What a user may ask of one video, in one schema that every edge derives from.

`VideoSettings` holds the per-video fields and their limits. The HTTP body (`cluster.api.VideoCreate`) and a
bulk manifest's row (`jobs.manifest.RenderSettings`) subclass it; `pab generate` and `jobs.render` build their
options from it (`add_options`, `from_options`). `engine_fields()` is what the pipeline's `GenerationRequest`
takes. The cache's rule schemas sit here too, next to the field that holds them; `pab.broadcast` and
`pab.stepcache` own what they mean.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
)  # fmt: skip

from pab.errors import RequestError
from pab.seeds import SEED_LIMIT


def _no_bool(v: Any) -> Any:
    """JSON true/false is not a number here (pydantic would read true as 1: one frame, a guidance of 1.0)."""
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
MAX_FRAMES = 1024  # num_frames' limit, which a duration (`seconds` in the HTTP API) must keep as well


class BroadcastRuleIn(BaseModel):
    """Reuse a kind of module's output: recompute every `range` steps while `window[0] < t < window[1]`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    range: Int = Field(ge=1, le=1000)
    window: tuple[Float, Float]
    # Which blocks exist depends on the model: the engine's check answers with its range (422 naming the field).
    blocks: list[Int] | None = None

    @field_validator("window")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError("window must be [lo, hi] with lo < hi (timesteps on the 0-1000 scale)")
        if v[1] <= 1:  # a fraction of the schedule, which reads as the last thousandth of it: no step is in there
            raise ValueError(f"window {list(v)} is on the 0-1000 timestep scale, so it holds no step; for "
                             f"{v[0]:g}-{v[1]:g} of the schedule write [{v[0] * 1000:g}, {v[1] * 1000:g}]")
        return v


class PABSettings(BaseModel):
    """Per kind of module either null (always compute) or a broadcast rule."""

    model_config = ConfigDict(extra="forbid")
    spatial: BroadcastRuleIn | None = None
    temporal: BroadcastRuleIn | None = None
    cross: BroadcastRuleIn | None = None
    mlp: BroadcastRuleIn | None = None


class StepPolicyIn(BaseModel):
    """A step-reuse policy with its numbers (`pab.stepcache.StepReuseConfig`; `pab calibrate` writes them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    policy: Literal["teacache", "magcache", "fixed"]
    threshold: Float = Field(0.0, ge=0, le=1e6)
    coefficients: list[Float] = Field(default_factory=list, max_length=16)
    ratios: list[Float] = Field(default_factory=list, max_length=10_000)
    max_skips: Int = Field(2, ge=0, le=10_000)
    warmup: Int = Field(1, ge=0, le=10_000)
    cooldown: Int = Field(1, ge=0, le=10_000)
    reuse: list[Int] = Field(default_factory=list, max_length=10_000)
    reuse_of: Int = Field(0, ge=0, le=10_000)


# A preset by name (off, paper, teacache-slow, ...): never a path, so a request cannot make a server read a file.
# The command line reads a FILE.json of rules or a policy itself, at the edge (`from_options`).
CacheName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]


def _cache_branch(v: Any) -> str | None:
    """Which of the cache's forms `v` is meant as: an object with a `policy` is a step-reuse policy, any other
    object PAB rules. Chosen up front, so a misspelt rule name is reported as such, not as a missing `policy`."""
    if v is None:
        return "None"
    if isinstance(v, str):
        return "CacheName"
    if isinstance(v, StepPolicyIn | PABSettings):
        return type(v).__name__
    if isinstance(v, dict):
        return "StepPolicyIn" if "policy" in v else "PABSettings"
    return None


Cache = Annotated[
    Union[
        Annotated[CacheName, Tag("CacheName")],
        Annotated[StepPolicyIn, Tag("StepPolicyIn")],
        Annotated[PABSettings, Tag("PABSettings")],
        Annotated[None, Tag("None")],
    ],
    Discriminator(_cache_branch, custom_error_type="cache_type", custom_error_message="must be a preset name, "
                  "an object of PAB rules or a step-reuse policy, or null"),
]

S = TypeVar("S", bound="VideoSettings")


class VideoSettings(BaseModel):
    """One video's settings. A field left out takes the model's default (`pab models`, `GET /v1/models`)."""

    # NaN and Infinity are refused by name (JSON parsers accept them; no field means them).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    negative_prompt: str = Field("", max_length=4000, description="what the video should not show (CFG)")
    num_frames: Int | None = Field(None, ge=1, le=MAX_FRAMES, description="frames; the model says which counts work")
    height: Int | None = Field(None, ge=16, le=4096, description="pixel height")
    width: Int | None = Field(None, ge=16, le=4096, description="pixel width")
    fps: Int | None = Field(None, ge=1, le=120, description="frames per second of the mp4")
    steps: Int | None = Field(None, ge=1, le=1000, description="denoising steps")
    guidance_scale: Float | None = Field(None, ge=0, le=50, description="classifier-free guidance scale")
    seed: Int | None = Field(None, ge=0, lt=SEED_LIMIT, description="the noise's seed; none: drawn once")
    cache: Cache = Field(
        None, description="off, paper (PAB), a step-reuse preset the model is calibrated for (teacache-slow, "
        "teacache-fast, magcache-slow, magcache-fast), PAB rules per kind, or a step-reuse policy",
    )
    pab: Cache = Field(None, description="the older name of cache")
    precision: Literal["bf16", "fp8"] | None = Field(
        None, description="bf16 (default): the model's dtype for every GEMM; fp8: the attentions' and MLPs' GEMMs "
        "in e4m3 with per-token and per-channel scales (faster on Hopper/Ada GPUs, small error: docs/quality.md)",
    )

    @field_validator("pab")
    @classmethod
    def _agrees_with_cache(cls, pab: Any, info: Any) -> Any:
        # `pab: off` beside `cache: paper` ran paper: the engine cannot tell an explicit off from its default
        cache = info.data.get("cache")
        if pab is not None and cache is not None and pab != cache:
            shown = [repr(v) if isinstance(v, str) else "custom settings" for v in (cache, pab)]
            raise ValueError(f"cache {shown[0]} and pab {shown[1]} disagree; give one (pab is cache's older name)")
        return pab

    def engine_fields(self) -> dict[str, Any]:
        """The fields as `pab.pipeline.GenerationRequest` takes them: rules and policies as plain dicts of what
        was given (the engine fills the rest, as it does for a dict from Python)."""
        out = {name: getattr(self, name) for name in VideoSettings.model_fields}
        for name in ("cache", "pab"):
            if isinstance(out[name], BaseModel):
                out[name] = out[name].model_dump(exclude_unset=True)
        out["pab"] = "off" if out["pab"] is None else out["pab"]
        return out


# ----------------------------------------------------------------------------------------------------
# The command line's options, derived from the schema


def _scalar(annotation: Any) -> type:
    """int, float or str: what argparse reads a field's value as."""
    for t in (int, float):
        if annotation is t or t in _flatten(annotation):
            return t
    return str


def _flatten(annotation: Any) -> set[Any]:
    if get_origin(annotation) is Annotated:
        return _flatten(get_args(annotation)[0])
    args = get_args(annotation)
    return set().union(*(_flatten(a) for a in args)) if args else {annotation}


def add_options(group: argparse._ActionsContainer, helps: dict[str, str] | None = None, **defaults: Any) -> None:
    """`--negative-prompt`, `--num-frames`, ... `--cache`, `--pab`: one option per field, its help the field's
    (or `helps[field]` where an edge means something else by it, e.g. its own default seed). `--guidance`
    stays as another spelling of `--guidance-scale`."""
    for name, info in VideoSettings.model_fields.items():
        flags = [f"--{name.replace('_', '-')}"] + (["--guidance"] if name == "guidance_scale" else [])
        kind = _scalar(info.annotation) if name not in ("cache", "pab") else str
        help = (helps or {}).get(name) or info.description or ""
        if name in ("cache", "pab"):
            help += "; or FILE.json of PAB rules or one policy"
        group.add_argument(*flags, dest=name, type=kind, default=defaults.get(name, info.default), help=help)


def from_options(args: argparse.Namespace, schema: type[S] = VideoSettings) -> S:  # type: ignore[assignment]
    """The settings the options ask for, as `schema` (VideoSettings or a subclass); a RequestError naming the
    option (`--num-frames: ...`) when one is wrong. A `--cache` / `--pab` value that is a .json file is read
    here: the command line may name local files."""
    values = {name: getattr(args, name) for name in VideoSettings.model_fields}
    for name in ("cache", "pab"):
        v = values[name]
        if isinstance(v, str) and (v.endswith(".json") or v.lstrip().startswith("{")):
            values[name] = _json_option(name, v)
    try:
        return schema.model_validate(values)
    except ValidationError as e:
        raise request_error(e, prefix="--") from None


def _json_option(name: str, value: str) -> Any:
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise RequestError(name, f"--{name}: settings file {value!r} does not exist")
        text = path.read_text()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(name, f"--{name}: {value!r} is not valid JSON: {e}") from None
    if isinstance(doc, dict) and "presets" in doc:
        raise RequestError(name, f"--{name}: {value} is a calibration file; pass one of its presets by name with "
                           f"the model's weights beside it: {sorted(doc['presets'])}")  # fmt: skip
    return doc


def field_path(loc: Any) -> str:
    """Where a validation error is, dotted ("cache.spatial.range"), without pydantic's union-member tags
    ("constrained-str", "PABSettings"; field names are lower-case identifiers)."""
    return ".".join(str(p) for p in loc if not _is_tag(p))


def _is_tag(part: Any) -> bool:
    """A union member's tag in an error's `loc`, not a field name or an index."""
    return isinstance(part, str) and not (part.isidentifier() and not part[:1].isupper())


def deepest_first(errors: list[dict[str, Any]], skip: int = 0) -> list[dict[str, Any]]:
    """Pydantic's errors, the deepest first (their `loc` less its first `skip` parts, e.g. FastAPI's "body"): the
    field that is wrong before the object that holds it. Stable otherwise."""
    return sorted(errors, key=lambda e: -len(field_path(e["loc"][skip:]).split(".")))


def error_message(err: dict[str, Any]) -> str:
    """An error's text without pydantic's "Value error, " before what our own checks say."""
    return str(err["msg"]).removeprefix("Value error, ")


def describe(error: ValidationError, prefix: str = "") -> str:
    """A validation error in one line, a problem per field (`--num-frames: ...` with prefix "--")."""
    said: dict[str, str] = {}
    for err in deepest_first(error.errors()):
        path = field_path(err["loc"])
        top = path.split(".")[0]
        if top not in said:
            name = prefix + top.replace("_", "-") + path[len(top):] if prefix else path  # --num-frames, num_frames
            got = err.get("input")
            shown = f" (got {got!r})" if isinstance(got, (int, float, str)) and len(repr(got)) < 40 else ""
            said[top] = (f"{name}: {error_message(err)}" if path else error_message(err)) + shown
    return "; ".join(said.values())


def request_error(error: ValidationError, prefix: str = "") -> RequestError:
    """`describe`'s line as a RequestError at the field it reports first (the deepest; "" for the settings as
    a whole)."""
    errors = deepest_first(error.errors())
    return RequestError(field_path(errors[0]["loc"]) if errors else "", describe(error, prefix))
