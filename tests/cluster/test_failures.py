"""The ingress tells group failures apart by type, through a real Serve deployment and a real rank actor.

The chain is the product's: a rank actor raises, the group replica (a Serve deployment) re-raises what the
rank raised or its own GroupFailed / GroupUnavailable, and the caller awaits the deployment's response.
"""

from __future__ import annotations

import os
import uuid

import pytest
from ray.exceptions import RayTaskError

from actors.group import GroupFailed, GroupUnavailable
from cluster import failures
from pab.storage import StorageUnavailable

STORE = "storage unavailable: could not store video v1 in the local folder /x (Read-only file system)"


@pytest.fixture(scope="module")
def replica(serve_port):
    import ray
    from ray import serve

    @ray.remote(num_cpus=0)
    class Rank:
        def store(self):
            raise StorageUnavailable(STORE)

        def die(self):
            os._exit(1)  # the rank's process ends in the middle of a call, as a crashed rank's does

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Group:
        def __init__(self):
            self.rank = Rank.remote()

        def run(self, what: str):
            if what == "storage":
                try:
                    ray.get(self.rank.store.remote())
                except StorageUnavailable as e:  # what GpuGroup._judge hands on: the rank's own error
                    raise e
            if what == "refused":
                raise GroupUnavailable("group g1 is broken: rank 1 died")
            if what == "rank died":
                # Not ray.kill then a call: the kill is asynchronous, and the call could be answered first (it
                # was, once in CI).
                try:
                    ray.get(self.rank.die.remote())
                except ray.exceptions.RayActorError as e:
                    self.rank = Rank.remote()
                    raise GroupFailed("group g1: rank 0 died") from e
            if what == "bug":
                raise KeyError("height")
            return "ok"

    name = "failures-" + uuid.uuid4().hex[:6]
    handle = serve.run(Group.bind(), name=name, route_prefix=None)
    yield handle
    serve.delete(name)


def call(handle, what: str) -> BaseException:
    with pytest.raises(Exception) as info:
        handle.run.remote(what).result(timeout_s=60)
    return info.value


def test_a_storage_loss_two_actors_away_is_found_by_type(replica):
    e = call(replica, "storage")
    lost = failures.storage_cause(e)
    assert type(lost) is StorageUnavailable and str(lost) == STORE  # the original, not Ray's copy
    assert not failures.refused(e) and failures.describe(e) == f"StorageUnavailable: {STORE}"


def test_a_group_that_refused_costs_no_attempt(replica):
    e = call(replica, "refused")
    assert failures.refused(e) and failures.storage_cause(e) is None
    assert failures.describe(e) == "GroupUnavailable: group g1 is broken: rank 1 died"


def test_a_rank_death_is_a_group_failure_naming_the_rank(replica):
    e = call(replica, "rank died")
    assert not failures.refused(e) and failures.storage_cause(e) is None
    assert failures.describe(e) == "GroupFailed: group g1: rank 0 died"


def test_an_unknown_error_is_named_by_its_last_line(replica):
    e = call(replica, "bug")
    assert isinstance(e, RayTaskError) and failures.storage_cause(e) is None and not failures.refused(e)
    assert failures.describe(e).endswith("KeyError: 'height'")


def test_a_message_that_merely_mentions_a_failure_is_not_one():
    # The text-based reading it replaces took any line naming "StorageUnavailable" or "GroupUnavailable".
    e = RuntimeError("prompt: 'why GroupUnavailable: StorageUnavailable: x' is not a failure")
    assert failures.storage_cause(e) is None and not failures.refused(e)
    assert failures.describe(e).startswith("RuntimeError: ")


def test_a_long_reason_is_cut_between_words():
    """Ray's actor-death text runs past 500 characters; it was cut mid-word ("...SIGSEGV or another unex")."""
    from actors.group import GroupFailed

    said = failures.describe(GroupFailed("rank 0 died: " + "the worker process exited unexpectedly " * 20))
    assert len(said) <= 500 and said.endswith("…"), said
    assert said[:-1].split()[-1] in {"the", "worker", "process", "exited", "unexpectedly"}, said  # a whole word
