"""Exceptions every layer shares. Light on purpose: the Ray side imports it without importing torch."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


class GenerationCancelled(RuntimeError):
    """A generation stopped because it was asked to: by the pipeline's `should_cancel`, by one rank of a group
    (every rank then stops at the same step), or by the group as a whole. One class from the denoising loop up
    to the job record, so every layer recognises a cancel the same way."""


class RequestError(ValueError):
    """A request the engine cannot take, and the field it is about: a dotted path into the request
    ("num_frames", "cache.spatial.blocks"; the cache is "cache" whichever of its names the request used).

    A ValueError whose text is the message alone, so every `except ValueError` and every caller that shows the
    text keeps working. A rule or policy raises it with a path relative to itself ("range"); `about` puts that
    under the field holding it. "" is the value as a whole.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles errors between processes; the default would call RequestError(message) and fail.
        return type(self), (self.field, str(self))


@contextlib.contextmanager
def about(field: str) -> Iterator[None]:
    """ValueErrors raised inside are about `field`: a RequestError's own path goes under it ("range" in
    "cache.spatial"), any other ValueError names `field` itself."""
    try:
        yield
    except RequestError as e:
        e.field = f"{field}.{e.field}" if e.field else field
        raise
    except ValueError as e:
        raise RequestError(field, str(e)) from e
