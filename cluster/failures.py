"""What a group call's failure was, read off its type through Ray's wrapping, never off its text.

Ray re-raises a remote error as an instance of its own class too (`RayTaskError.as_instanceof_cause`), with the
original as `.cause`; an error re-raised by a second actor (a rank's, by the group replica) is wrapped twice.
`cause_of` walks that chain, so the ingress tells a storage loss, a group that refused before starting, a
group that broke mid-video and a replica that died apart by class.
"""

from __future__ import annotations

from typing import TypeVar

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from actors.group import GroupFailed, GroupUnavailable, clip
from pab.storage import StorageUnavailable

E = TypeVar("E", bound=BaseException)


class NothingRendered(StorageUnavailable):
    """Storage failed before the group started rendering (reading or claiming the job): no video was lost, so
    the job waits for storage without counting an attempt lost to it."""

# The failures the ingress knows, in the order they are looked for: a cause nearer the origin names it best.
KNOWN: tuple[type[BaseException], ...] = (
    StorageUnavailable, GroupUnavailable, GroupFailed, ActorDiedError, ActorUnavailableError, RayActorError,
)  # fmt: skip


def _chain(e: BaseException):
    """`e`, then what it wraps (Ray's `.cause`, Python's `__cause__`), innermost last."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__


def cause_of(e: BaseException, kind: type[E]) -> E | None:
    """The innermost `kind` error in `e`'s chain (the original, not Ray's dual-class copy), or None."""
    found = None
    for link in _chain(e):
        if isinstance(link, kind):
            found = link
    return found


def storage_cause(e: BaseException) -> StorageUnavailable | None:
    """The StorageUnavailable a group raised (its video or record could not be stored), or None."""
    return cause_of(e, StorageUnavailable)


def nothing_rendered(e: BaseException) -> bool:
    """Whether storage failed before the group started rendering (`NothingRendered`): nothing to count as lost."""
    return cause_of(e, NothingRendered) is not None


def refused(e: BaseException) -> bool:
    """Whether a broken or busy group refused the job before starting it (a retry costs no attempt)."""
    return cause_of(e, GroupUnavailable) is not None


def describe(e: BaseException) -> str:
    """One line naming what went wrong: the known failure's class and message, else the error's last line
    (where Ray puts the original "Type: message")."""
    for kind in KNOWN:
        cause = cause_of(e, kind)
        if cause is not None:
            return clip(f"{kind.__name__ if _copy(cause) else type(cause).__name__}: {_line(cause)}")
    return clip(f"{type(e).__name__}: {_line(e)}")


def _copy(e: BaseException) -> bool:
    return isinstance(e, RayTaskError)


def _line(e: BaseException) -> str:
    """An original error's first line (Ray's own errors go on with details); Ray's copy's last line (its str()
    is the remote traceback, ending in the original "Type: message")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if _copy(e) else lines[0]) if lines else ""
