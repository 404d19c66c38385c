"""GpuGroup on a real local Ray cluster with fake GPUs, running the real engine (latte-1-tiny, DSP over gloo)."""

from __future__ import annotations

import io
import threading
import time

import av
import numpy as np
import pytest

from actors.group import GenerationCancelled, GenerationError, GpuGroup, GroupFailed, GroupUnavailable, group_bundles

MODEL = "opensora-v1.2-tiny"
SMALL = {"prompt": "a red fox in the snow", "num_frames": 17, "height": 32, "width": 32, "steps": 6, "seed": 11}
# Long enough (several seconds on 2 shared cores) to act on it mid-video.
LONG = {"prompt": "a long video", "num_frames": 17, "height": 64, "width": 64, "steps": 300, "seed": 2}


def decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_bundles():
    assert group_bundles(2, 1, 0.5, first_bundle_extra_cpus=0.25) == [{"GPU": 1.0, "CPU": 0.75},
                                                                      {"GPU": 1.0, "CPU": 0.5}]
    assert group_bundles(1, 0, 1) == [{"CPU": 1.0}]
    # custom resources choose the node: bundle 0 asks, STRICT_PACK keeps the rest of the group beside it
    assert group_bundles(2, 1, 1, resources={"pab-gpu-2": 1}) == [{"GPU": 1.0, "CPU": 1.0, "pab-gpu-2": 1.0},
                                                                    {"GPU": 1.0, "CPU": 1.0}]


def test_a_video_waits_for_the_one_before_it_to_stop_then_runs():
    """A dropped call's render stops at its next step: the next video waits for it (no Ray: only the lock is real)."""
    g = GpuGroup(MODEL, busy_wait_s=5.0)
    g.broken, ran = None, []
    g._generate = lambda *args: ran.append(time.monotonic()) or {"ok": True}
    g._lock.acquire()  # the render before it, stopping
    threading.Timer(0.3, g._lock.release).start()
    t0 = time.monotonic()
    assert g.generate({"prompt": "x"}) == {"ok": True} and ran[0] - t0 >= 0.25
    g.busy_wait_s = 0.2
    g._lock.acquire()  # one that does not stop in time: refused, as a broken group's call is (costs no attempt)
    with pytest.raises(GroupUnavailable, match="still rendering another video after 0.2 s"):
        g.generate({"prompt": "x"})
    g._lock.release()


@pytest.fixture(scope="module")
def group(ray_session):
    g = GpuGroup(MODEL, size=2, cpus_per_rank=0.5, device="auto", start_timeout_s=300)
    g.start()
    yield g
    g.shutdown()


def test_two_rank_group_renders_with_progress(group, ray_session):
    info = group.info
    assert info["init_method"].startswith("tcp://127.0.0.1:")
    assert sorted(g for n in info["nodes"] for g in n["gpu_ids"]) != [] and len(info["nodes"]) == 2
    assert len({n["gpu_ids"][0] for n in info["nodes"]}) == 2  # one fake GPU each, disjoint
    steps = []
    res = group.generate(SMALL, on_progress=lambda s, n: steps.append((s, n)))
    assert steps == [(i, 6) for i in range(1, 7)]  # every denoising step, in order
    frames = decode(res["mp4"])
    assert frames.shape == (17, 32, 32, 3)
    assert res["parallel"]["sp"] == 2 and res["group"]["size"] == 2
    assert res["parallel"]["comm"]["all_to_all_done"] > 0  # DSP really moved tokens between the ranks
    h = group.health()
    assert [r["rank"] for r in h["ranks"]] == [0, 1] and all(r["loaded"] for r in h["ranks"])
    with pytest.raises(GenerationError, match="prompt"):
        group.generate({**SMALL, "prompt": " "})
    group.health()  # a rejected request leaves the group healthy


def test_cancel_stops_every_rank_at_the_same_step(group):
    steps = []
    stop = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(GenerationCancelled):
        group.generate(LONG, on_progress=lambda s, n: (steps.append(s), s >= 3 and stop.set()),
                       should_cancel=stop.is_set)
    assert 3 <= len(steps) < LONG["steps"] and time.monotonic() - t0 < 120
    res = group.generate(SMALL)  # still usable: no rank was left inside a collective
    assert decode(res["mp4"]).shape[0] == 17


@pytest.mark.faults
def long_render(group: GpuGroup) -> tuple[threading.Thread, list[Exception]]:
    """LONG rendering on `group` in a thread, returned once its first step is done, with the list its error lands in."""
    started = threading.Event()
    errors: list[Exception] = []

    def run():
        try:
            group.generate(LONG, on_progress=lambda s, n: started.set())
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(120)
    return t, errors


def test_dead_rank_fails_the_group_cleanly_and_it_rebuilds(group, ray_session):
    ray = ray_session
    t, errors = long_render(group)
    t_kill = time.monotonic()
    ray.kill(ray.get_actor(f"{group.name}-rank1"))
    t.join(120)
    assert isinstance(errors[0], GroupFailed) and "rank 1 died" in str(errors[0])
    assert time.monotonic() - t_kill < 30  # fails fast; rank 0 is not waited for
    with pytest.raises(GroupFailed):
        group.health()
    with pytest.raises(GroupUnavailable):
        group.generate(SMALL)
    group.rebuild()
    group.health()
    assert decode(group.generate(SMALL)["mp4"]).shape == (17, 32, 32, 3)


def test_a_hung_rank_is_reported_as_hung_not_as_killed(group):
    """A rank stopped mid-video (SIGSTOP: a hung driver, a stalled node) fails the health check, which stops the
    ranks; the render then saw an actor "killed by ray.kill" and said the rank died."""
    import os
    import signal

    group.rebuild()
    t, errors = long_render(group)
    pid = group.health()["ranks"][1]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(GroupFailed, match="did not answer the health check within 2"):
            group.health(timeout_s=2)
        t.join(120)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # killed by the group already; should it not be, let it go
        except ProcessLookupError:
            pass
    assert isinstance(errors[0], GroupFailed) and "did not answer the health check" in str(errors[0]), errors
    assert "died during a generation" not in str(errors[0])
    group.rebuild()
    assert decode(group.generate(SMALL)["mp4"]).shape == (17, 32, 32, 3)
