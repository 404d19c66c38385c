"""The HTTP API's request and response bodies (pydantic), in the shape of the OpenAI Videos API.

`POST /v1/videos` takes `VideoCreate`; every job is returned as a `Video`. Fields beyond OpenAI's
(`num_frames`, `height`, `width`, `fps`, `steps`, `guidance_scale`, `seed`, `cache` and its older name `pab`,
`negative_prompt`) follow vLLM-Omni's extensions.

The body is JSON or a form: the official `openai` SDK always sends `multipart/form-data`, every field as
text. `form_fields` turns a form into the dict that `VideoCreate` validates, so both take one path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
PAB_KINDS = ("spatial", "temporal", "cross", "mlp")


def _no_bool(v: Any) -> Any:
    """JSON true/false is not a number here (pydantic would read true as 1 frame)."""
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


class BroadcastRuleIn(BaseModel):
    """Reuse a kind of module's output: recompute every `range` steps while `window[0] < t < window[1]`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    range: int = Field(ge=1, le=1000)
    window: tuple[float, float]
    # Which blocks exist depends on the model: the engine's check answers with its range (422 naming the field).
    blocks: list[Annotated[int, BeforeValidator(_no_bool)]] | None = None

    _ints = field_validator("range", mode="before")(_no_bool)

    @field_validator("window")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError("window must be [lo, hi] with lo < hi (timesteps on the 0-1000 scale)")
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
    threshold: float = Field(0.0, ge=0, le=1e6)
    coefficients: list[float] = Field(default_factory=list, max_length=16)
    ratios: list[float] = Field(default_factory=list, max_length=10_000)
    max_skips: int = Field(2, ge=0, le=10_000)
    warmup: int = Field(1, ge=0, le=10_000)
    cooldown: int = Field(1, ge=0, le=10_000)
    reuse: list[Annotated[int, BeforeValidator(_no_bool)]] = Field(default_factory=list, max_length=10_000)
    reuse_of: int = Field(0, ge=0, le=10_000)

    _ints = field_validator("max_skips", "warmup", "cooldown", "reuse_of", mode="before")(_no_bool)


# A preset by name (off, paper, teacache-slow, ...): never a path, so a request cannot make the server read a file.
CacheName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]


class VideoCreate(BaseModel):
    """A request to render one video. Fields left out take the model's defaults (`GET /v1/models`)."""

    # NaN and Infinity are refused by name (JSON parsers here accept them; no field means them).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="a model from GET /v1/models; default: the server's first model")
    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str = Field("", max_length=4000)
    num_frames: int | None = Field(None, ge=1, le=1024, description="frames; or give `seconds`")
    seconds: float | None = Field(None, gt=0, le=120, description="duration; frames = the model's nearest count")
    height: int | None = Field(None, ge=16, le=4096)
    width: int | None = Field(None, ge=16, le=4096)
    size: str | None = Field(None, description="'WxH' (OpenAI style), instead of width and height")
    fps: int | None = Field(None, ge=1, le=120)
    steps: int | None = Field(None, ge=1, le=1000, description="denoising steps")
    guidance_scale: float | None = Field(None, ge=0, le=50)
    seed: int | None = Field(None, ge=0, le=2**31 - 2)
    pab: Literal["off", "paper"] | PABSettings | None = Field(
        None, description="'off', 'paper' (the paper's preset for this model) or per-kind rules"
    )
    cache: CacheName | StepPolicyIn | PABSettings | None = Field(
        None, description="'off', 'paper', a step-reuse preset the model is calibrated for (teacache-slow, "
        "teacache-fast, magcache-slow, magcache-fast), per-kind PAB rules, or a step-reuse policy; `pab` is its "
        "older name",
    )

    _ints = field_validator("num_frames", "height", "width", "fps", "steps", "seed", mode="before")(_no_bool)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be blank")
        return v

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds_string(cls, v: Any) -> Any:
        # OpenAI clients send seconds as a string ("4").
        return float(v) if isinstance(v, str) and re.fullmatch(r"\d+(\.\d+)?", v.strip()) else v

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = re.fullmatch(r"(\d+)x(\d+)", v.strip())
        if not m:
            raise ValueError("size must look like '1280x720' (width x height)")
        w, h = int(m.group(1)), int(m.group(2))
        if not (16 <= w <= 4096 and 16 <= h <= 4096):
            raise ValueError("size: width and height must each be between 16 and 4096")
        return f"{w}x{h}"

    @model_validator(mode="after")
    def _one_way_each(self) -> "VideoCreate":
        if self.num_frames is not None and self.seconds is not None:
            raise ValueError("give num_frames or seconds, not both")
        if self.size is not None and (self.width is not None or self.height is not None):
            raise ValueError("give size or width/height, not both")
        return self

    def engine_request(self, model: str) -> dict[str, Any]:
        """The engine's request fields (size split into width and height; seconds handled by the caller)."""
        width, height = self.width, self.height
        if self.size is not None:
            width, height = (int(x) for x in self.size.split("x"))
        pab: Any = self.pab.model_dump() if isinstance(self.pab, PABSettings) else self.pab
        cache: Any = self.cache.model_dump() if isinstance(self.cache, BaseModel) else self.cache
        return {
            "model": model, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "num_frames": self.num_frames, "height": height, "width": width, "fps": self.fps, "steps": self.steps,
            "guidance_scale": self.guidance_scale, "seed": self.seed, "pab": "off" if pab is None else pab,
            "cache": cache,
        }


# Form values that stay text; any other field's value is read as JSON ("17", "4.5", "true", "NaN", a rules
# object) when it is JSON, else kept as text ("paper", "many") for the schema to judge.
_TEXT_FIELDS = frozenset(n for n, f in VideoCreate.model_fields.items() if f.annotation in (str, str | None))
_BRACKETS = re.compile(r"([A-Za-z_]\w*)((?:\[\w*\])+)")  # pab[spatial][window][]


def _from_text(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # not JSON (or nested past the parser's depth): the text itself
        return value


def form_fields(items: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """A form's (name, text) pairs as the dict `VideoCreate.model_validate` takes.

    The openai SDK sends a nested `extra_body` in bracket notation (`pab[spatial][range]=2`,
    `pab[spatial][window][]=450` once per item); that nests again here. A name repeated without `[]`
    keeps its last value, as Starlette's form does. A key of another shape stays as it came and is
    refused by name as an unknown field.
    """
    data: dict[str, Any] = {}
    for key, value in items:
        m = _BRACKETS.fullmatch(key)
        if m is None:
            data[key] = value if key in _TEXT_FIELDS else _from_text(value)
            continue
        parts = [m[1], *re.findall(r"\[(\w*)\]", m[2])]
        append = parts[-1] == ""
        if append:
            parts.pop()
        if "" in parts or not _put(data, parts, _from_text(value), append):
            data[key] = value
    return data


def _put(data: dict[str, Any], path: list[str], value: Any, append: bool) -> bool:
    """Set (or append to) `data[path[0]][path[1]]...`; False when the path runs into a value of another kind."""
    node: Any = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return False
    if not append:
        node[path[-1]] = value
        return True
    items = node.setdefault(path[-1], [])
    if not isinstance(items, list):
        return False
    items.append(value)
    return True


class ErrorInfo(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """A video job as the API returns it."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Status
    progress: int = Field(0, ge=0, le=100, description="percent of denoising steps done; 100 when completed")
    step: int = 0
    total_steps: int = 0
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    prompt: str
    seconds: str
    size: str = Field(description="'WxH' of the video as rendered: each side a whole number of the model's patches")
    notices: list[str] = Field(default_factory=list, description="where the video differs from the request, and why")
    request: dict[str, Any]
    seed: int
    attempts: int = Field(0, description="tries that failed because a GPU group died")
    cancel_requested: bool = False
    error: ErrorInfo | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    cost: dict[str, float] | None = Field(None, description="gpu_seconds, rank_seconds, bytes_sent (DSP), "
                                          "modules_computed and modules_reused (PAB) of the render")
    pab: dict[str, Any] | None = None
    cache: dict[str, Any] | None = Field(None, description="the cache policy that ran and, for step reuse, the "
                                         "steps it computed and reused")
    media_type: str = "video/mp4"
    size_bytes: int | None = None
    group: dict[str, Any] | None = None


class VideoDeleted(BaseModel):
    """What DELETE answers (OpenAI's shape): the video and its files are gone."""

    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "pab-cluster"
    defaults: dict[str, Any]
    groups: list[dict[str, Any]]
