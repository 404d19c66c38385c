"""The HTTP API's request and response bodies (pydantic), in the shape of the OpenAI Videos API.

`POST /v1/videos` takes `VideoCreate`; every job is returned as a `Video`. Fields beyond OpenAI's
(`num_frames`, `height`, `width`, `fps`, `steps`, `guidance_scale`, `seed`, `cache` and its older name `pab`,
`negative_prompt`) follow vLLM-Omni's extensions.

The per-video fields and their limits are `pab.request.VideoSettings`, shared with the command line and bulk
manifests. The body is JSON or a form: the official `openai` SDK always sends `multipart/form-data`, every field as
text. `form_fields` turns a form into the dict that `VideoCreate` validates, so both take one path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from pab.request import Float, VideoSettings

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class VideoCreate(VideoSettings):
    """A request to render one video: `VideoSettings` plus the model, the prompt and OpenAI's `seconds` and
    `size`. Fields left out take the model's defaults (`GET /v1/models`)."""

    model: str | None = Field(None, min_length=1, description="a model from GET /v1/models; default: the server's "
                              "first model")
    prompt: str = Field(min_length=1, max_length=4000)
    seconds: Float | None = Field(None, gt=0, le=120, description="duration; frames = the model's nearest count")
    size: str | None = Field(None, description="'WxH' (OpenAI style), instead of width and height")

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
        fields = {"model": model, "prompt": self.prompt, **self.engine_fields()}
        if self.size is not None:
            fields["width"], fields["height"] = (int(x) for x in self.size.split("x"))
        return fields


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


# A field a remix is given replaces these of its video's request too: the two ways to say one thing.
_SAME_THING = {"size": ("width", "height"), "seconds": ("num_frames",), "cache": ("pab",), "pab": ("cache",)}


def remix_fields(source: dict[str, Any], given: Any) -> Any:
    """The body of a remix: the `request` its video rendered (model, resolved settings, seed) with the fields
    `given` in its body in place of theirs. A body that is not an object is returned for the schema to refuse."""
    if not isinstance(given, dict):
        return given
    out = {k: v for k, v in source.items() if k in VideoCreate.model_fields}
    for name in given:
        for other in (name, *_SAME_THING.get(name, ())):
            out.pop(other, None)
    return {**out, **given}


def error_type(status: int) -> str:
    """OpenAI's error `type` for a status (its `code` names the case: "queue_full", "not_found", ...)."""
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")  # fmt: skip


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, for every 4xx and 5xx (the openai SDK's exceptions take their message from it)."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


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
    # Whole Unix seconds, as OpenAI's Video has them (typed clients decode them as integers); `timings` has the
    # fractions.
    created_at: int
    started_at: int | None = None
    completed_at: int | None = None
    expires_at: int | None = Field(None, description="when the video is removed: never (until deleted)")
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
    remixed_from_video_id: str | None = Field(None, description="the video a remix took its settings from")


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
    cache_presets: list[str] = Field(default_factory=lambda: ["off", "paper"],
                                     description="the names `cache` takes for this model: off, paper (PAB) and the "
                                     "step-reuse presets of its weights")  # fmt: skip
