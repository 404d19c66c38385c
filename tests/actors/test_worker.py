"""GenerationWorker without Ray: lifecycle, mp4 output, storage output, agreed cancellation, S3 checkpoints."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import uuid

import av
import numpy as np
import pytest

from actors.worker import GenerationWorker, WorkerError
from pab.errors import GenerationCancelled
from pab.checkpoint import fetch_s3, s3_downloads
from pab.storage import storage_from_config

FAKE = "fake_engine:make"  # the test double in tests/actors/fake_engine.py


def decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_single_rank_returns_decodable_mp4():
    w = GenerationWorker(0, 1, "latte-1-tiny", device="auto", engine_factory=FAKE)
    with pytest.raises(WorkerError):
        w.generate({"prompt": "x"})
    w.init_distributed(None)  # a group of one needs no process group
    w.load()
    steps = []
    res = w.generate({"prompt": "a fox", "steps": 3, "num_frames": 5, "height": 32, "width": 48},
                     lambda s, n: steps.append((s, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    frames = decode(res["mp4"])
    assert frames.shape == (5, 32, 48, 3) and res["num_frames"] == 5
    assert isinstance(res["seed"], int)  # drawn when the caller left it out
    assert w.health()["generations"] == 1 and not w.health()["busy"]


def test_a_cancel_after_the_last_step_stops_the_decode():
    """The worker's cancel reaches the pipeline's decode too (a local check: rank 0 decodes alone), so a cancel
    during a long CPU decode is not left waiting for it."""
    w = GenerationWorker(0, 1, "opensora-v1.2-tiny", device="cpu")
    w.load()
    steps = []
    with pytest.raises(GenerationCancelled, match="during the decode"):
        w.generate({"prompt": "a fox", "steps": 2, "num_frames": 17, "height": 32, "width": 32},
                   lambda s, n: steps.append((s, n)), cancel_cb=lambda: len(steps) == 2)
    assert steps == [(1, 2), (2, 2)] and not w.health()["busy"]


def test_engine_options_reach_the_pipeline():
    """The pipeline engine gets a group's `engine_options` (serving's EngineOptions); without any, the defaults
    (and a factory is called exactly as before: the fake one above takes none)."""
    w = GenerationWorker(0, 1, "opensora-v1.2-tiny", device="cpu",
                         engine_options={"cuda_graphs": True, "vae_kernels": False})  # fmt: skip
    w.load()
    assert w.engine.pipe.graphs is not None and w.engine.pipe.vae_kernels is None
    default = GenerationWorker(0, 1, "opensora-v1.2-tiny", device="cpu")
    default.load()
    pipe = default.engine.pipe
    assert pipe.graphs is None and pipe.vae_kernels is not None and pipe.vae_kernels.fused > 0


def test_rank0_writes_video_and_sidecar(tmp_path):
    w = GenerationWorker(0, 1, "latte-1-tiny", engine_factory=FAKE)
    w.load()
    cfg = {"backend": "local", "path": str(tmp_path)}
    res = w.generate({"prompt": "a fox", "seed": 5, "steps": 2}, output={"storage": cfg, "video_id": "v1",
                                                                         "sidecar": {"job": "j1"}})
    store = storage_from_config(cfg)
    side = store.get_json(res["video"]["sidecar_key"])
    assert side["seed"] == 5 and side["job"] == "j1" and side["pab"]["stats"] == {"spatial": {"computed": 2}}
    assert "encode_s" in side["timings"] and decode(store.get_bytes("videos/v1.mp4")).shape[0] == 4
    assert "mp4" not in res


def _rank_main(rank, ports, q, device="cpu"):
    w = GenerationWorker(rank, 2, "latte-1-tiny", device=device.format(rank=rank), engine_factory=FAKE)
    if rank == 0:  # as actors.group does: rank 0 opens the store, the others learn its port
        port = w.host_store("127.0.0.1")
        ports.put(port)
    else:
        port = ports.get(timeout=60)
    w.init_distributed(f"tcp://127.0.0.1:{port}")
    w.load()
    seen = []
    calls = {"n": 0}

    def cancel_cb():  # only rank 1 wants to stop, and only from its third check on
        calls["n"] += 1
        return rank == 1 and calls["n"] >= 3

    try:
        w.generate({"prompt": "p", "seed": 1, "steps": 10}, lambda s, n: seen.append(s), cancel_cb)
        q.put((rank, "finished", seen))
    except GenerationCancelled:
        q.put((rank, "cancelled", seen))
    finally:
        w.shutdown()


def _cancel_run(device: str) -> list:
    ctx = mp.get_context("spawn")
    q, ports = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, ports, q, device)) for r in range(2)]
    for p in procs:
        p.start()
    out = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    return out


def test_cancel_is_agreed_by_all_ranks():
    """Rank 1 alone asks to stop; both ranks stop after the same step (no rank left in a collective)."""
    out = _cancel_run("cpu")
    assert [o[1] for o in out] == ["cancelled", "cancelled"]
    assert out[0][2] == out[1][2] == [1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.device_count() >= 2, reason="needs 2 CUDA GPUs")
def test_cancel_is_agreed_on_gpus_one_step_later():
    """NCCL: each step reads the previous step's agreement (no host sync), so both ranks stop together, one
    step after the step where rank 1 asked."""
    out = _cancel_run("cuda:{rank}")
    assert [o[1] for o in out] == ["cancelled", "cancelled"]
    assert out[0][2] == out[1][2] == [1, 2, 3]


def test_parallel_group_needs_a_seed():
    w = GenerationWorker(0, 2, "latte-1-tiny", engine_factory=FAKE)
    w.engine = object()  # loaded enough to reach the check
    with pytest.raises(ValueError, match="seed"):
        w.generate({"prompt": "p"})


def test_s3_checkpoint_is_downloaded_once(s3_server, tmp_path):
    c = s3_server.client()
    bucket = "ckpt-" + uuid.uuid4().hex[:6]
    c.create_bucket(Bucket=bucket)
    c.put_object(Bucket=bucket, Key="models/m1/transformer/config.json", Body=b"{}")
    c.put_object(Bucket=bucket, Key="models/m1/transformer/w.safetensors", Body=b"\x01" * 1000)
    s3 = {k: v for k, v in s3_server.storage_config(bucket).items() if k in ("endpoint_url", "access_key_id",
                                                                             "secret_access_key")}
    path = fetch_s3(f"s3://{bucket}/models/m1", tmp_path / "cache", s3)
    assert (path / "transformer" / "w.safetensors").read_bytes() == b"\x01" * 1000
    c.delete_object(Bucket=bucket, Key="models/m1/transformer/w.safetensors")
    # Cached: a second resolve (another rank, a restarted worker) does not go back to S3.
    assert fetch_s3(f"s3://{bucket}/models/m1", tmp_path / "cache", s3) == path
    assert (path / "transformer" / "w.safetensors").exists()
    # The cache's count of downloads: one, with what it fetched (what tests/multinode counts per node).
    (d,) = s3_downloads(tmp_path / "cache")
    assert d["uri"] == f"s3://{bucket}/models/m1" and d["files"] == 2 and d["bytes"] == 1002
    assert s3_downloads(tmp_path / "elsewhere") == []
    w = GenerationWorker(0, 1, "latte-1-tiny", checkpoint=f"s3://{bucket}/models/m1", vae=f"s3://{bucket}/models/m1",
                         text_encoder="owner/t5", cache_dir=str(tmp_path / "cache"), s3=s3, engine_factory=FAKE)
    w.load()
    assert w.engine.checkpoint == str(path) and w.engine.checkpoint_files == ["transformer"]
    # Each part's source: S3 fetched into the cache; a Hugging Face id goes on to the pipeline, which reads it.
    assert w.engine.parts == {"vae": str(path), "text_encoder": "owner/t5"}


def test_real_engine_single_rank(tmp_path):
    """The real pipeline (latte-1-tiny on CPU) behind the worker: mp4 + sidecar with PAB stats."""
    w = GenerationWorker(0, 1, "latte-1-tiny", device="cpu")
    w.load()
    cfg = {"backend": "local", "path": str(tmp_path)}
    steps = []
    res = w.generate({"prompt": "a red fox", "seed": 3, "steps": 6, "num_frames": 8, "height": 32, "width": 32,
                      "pab": "paper"}, lambda s, n: steps.append((s, n)), output={"storage": cfg, "video_id": "real"})
    assert steps == [(i, 6) for i in range(1, 7)]
    store = storage_from_config(cfg)
    frames = decode(store.get_bytes(res["video"]["key"]))
    assert frames.shape == (8, 32, 32, 3)
    side = store.get_json("videos/real.json")
    assert side["model"] == "latte-1-tiny" and side["seed"] == 3 and side["request"]["steps"] == 6
    assert side["pab"]["settings"]["spatial"] is not None
    assert sum(v.get("broadcast", 0) for v in side["pab"]["stats"].values()) > 0  # PAB really reused outputs
    assert {"denoise_s", "decode_s", "encode_s"} <= set(side["timings"])
    # One sidecar shape: what `pab generate` writes (the pipeline's), plus the group's fields.
    from pab.pipeline import GenerationRequest, Pipeline

    alone = Pipeline.from_name("latte-1-tiny", device="cpu").generate(
        GenerationRequest(model="latte-1-tiny", prompt="a red fox", seed=3, steps=2, num_frames=8, height=32, width=32))
    assert set(alone.sidecar()) | {"rank", "group", "cost"} <= set(side), set(alone.sidecar()) - set(side)
    assert all(side[k].keys() == alone.sidecar()[k].keys() for k in ("pab", "cache", "parallel"))
    # A step-reuse policy: the sidecar names it and the steps it reused.
    policy = {"policy": "magcache", "threshold": 10.0, "ratios": [1.0], "max_skips": 1}
    w.generate({"prompt": "a red fox", "seed": 3, "steps": 6, "num_frames": 8, "height": 32, "width": 32,
                "cache": policy}, output={"storage": cfg, "video_id": "reused"})
    cache = store.get_json("videos/reused.json")["cache"]
    assert cache["policy"]["step"]["policy"] == "magcache" and cache["stats"]["reused_steps"] == [1, 3]


def test_rank0_encodes_the_frames_while_they_are_decoded(monkeypatch):
    """With the real engine the mp4 is written chunk by chunk as the VAE decodes (Mp4Writer on a thread)."""
    import pab.video

    writes = []
    real_write = pab.video.Mp4Writer.write
    monkeypatch.setattr(pab.video.Mp4Writer, "write", lambda self, frames: (writes.append(len(frames)),
                                                                             real_write(self, frames)))
    w = GenerationWorker(0, 1, "opensora-v1.2-tiny", device="cpu")
    w.load()
    res = w.generate({"prompt": "a red fox", "seed": 3, "steps": 2, "num_frames": 17, "height": 32, "width": 32})
    assert sum(writes) == 17 and len(writes) > 1  # the spatial VAE's micro-batches, each encoded as it came
    assert decode(res["mp4"]).shape == (17, 32, 32, 3)


def test_a_killed_renders_scratch_folder_is_swept_by_the_next_worker(tmp_path):
    """A worker killed mid-render leaves its scratch folder (a partial mp4) behind; a loading worker removes the
    folders of dead processes, and keeps a live one's."""
    import subprocess
    import sys

    from actors.worker import sweep_scratch

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"pab-video-{gone.pid}-abc123"
    live = tmp_path / f"pab-video-{os.getpid()}-def456"
    other = tmp_path / "pab-video-xyz789"  # not ours to judge: no pid in its name
    for d in (dead, live, other):
        d.mkdir()
        (d / "video.mp4").write_bytes(b"partial")
    assert sweep_scratch(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and live.exists() and other.exists()
