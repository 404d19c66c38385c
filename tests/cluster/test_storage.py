"""The storage interface against a local folder and a real SeaweedFS S3 server."""

from __future__ import annotations

import os
import threading
import time
import uuid

import httpx
import numpy as np
import pytest

from pab.storage import (
    LocalStorage, NotFound, ObjectChanged, S3Storage, StorageConfig, image_key, storage_from_config,
)  # fmt: skip


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return storage_from_config({"backend": "local", "path": str(tmp_path / "out")})
    server = request.getfixturevalue("s3_server")
    return storage_from_config(server.storage_config("store-" + uuid.uuid4().hex[:8], prefix="pab/test"))


def test_roundtrip_list_delete(store):
    store.put_bytes("records/b.json", b"B")
    store.put_bytes("records/a.json", b"A")
    store.put_bytes("records/c.json", b"C")
    store.put_bytes("other/x", b"X")
    assert store.get_bytes("records/a.json") == b"A"
    assert b"".join(store.iter_bytes("records/c.json", chunk_size=1)) == b"C"
    assert store.list("records/") == ["records/a.json", "records/b.json", "records/c.json"]
    assert store.list("records/", start_after="records/a.json", limit=1) == ["records/b.json"]
    assert store.size("records/b.json") == 1 and store.exists("records/b.json")
    store.delete("records/b.json")
    store.delete("records/b.json")  # idempotent
    assert not store.exists("records/b.json")
    with pytest.raises(NotFound):
        store.get_bytes("records/b.json")
    with pytest.raises(NotFound):
        store.iter_bytes("nope")
    store.put_json("j/1.json", {"a": [1, 2]})
    assert store.get_json("j/1.json") == {"a": [1, 2]}
    for bad in ("/abs", "../up", "a/../../b", ""):
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"")


def test_a_conditional_write_lands_only_on_the_version_it_read(store):
    """`put_if`: None creates only what does not exist; a version replaces only that version, not one written
    since, nor an object deleted since."""
    first = store.put_json_if("jobs/r.json", {"n": 1}, None)
    obj, version = store.get_json_versioned("jobs/r.json")
    assert obj == {"n": 1} and version == first
    with pytest.raises(ObjectChanged):
        store.put_json_if("jobs/r.json", {"n": 9}, None)  # exists already
    second = store.put_json_if("jobs/r.json", {"n": 2}, first)
    assert second != first and store.get_json_versioned("jobs/r.json") == ({"n": 2}, second)
    with pytest.raises(ObjectChanged):
        store.put_json_if("jobs/r.json", {"n": 9}, first)  # a stale version
    store.put_json("jobs/r.json", {"n": 3})  # a plain write is a new version too
    with pytest.raises(ObjectChanged):
        store.put_json_if("jobs/r.json", {"n": 9}, second)
    _, third = store.get_versioned("jobs/r.json")
    store.delete("jobs/r.json")
    with pytest.raises(ObjectChanged):
        store.put_json_if("jobs/r.json", {"n": 9}, third)  # gone since it was read
    assert not store.exists("jobs/r.json")
    with pytest.raises(NotFound):
        store.get_versioned("jobs/r.json")


def test_concurrent_conditional_writes_lose_no_update(store):
    """Threads that each read, add one and write back conditionally (again on a conflict) never lose an increment,
    and of several writing the same read version exactly one wins. Threads on a local folder lock the folder as
    processes do (flock on separate descriptors)."""
    store.put_json("n.json", {"n": 0})
    threads, each = 4, 8

    def add() -> None:
        for _ in range(each):
            while True:
                obj, version = store.get_json_versioned("n.json")
                try:
                    store.put_json_if("n.json", {"n": obj["n"] + 1}, version)
                    break
                except ObjectChanged:
                    continue

    workers = [threading.Thread(target=add) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert store.get_json("n.json") == {"n": threads * each}

    _, version = store.get_versioned("n.json")
    wins, gate = [], threading.Barrier(6)

    def race(i: int) -> None:
        gate.wait()
        try:
            store.put_json_if("n.json", {"winner": i}, version)
            wins.append(i)
        except ObjectChanged:
            pass

    racers = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for r in racers:
        r.start()
    for r in racers:
        r.join(60)
    assert len(wins) == 1 and store.get_json("n.json") == {"winner": wins[0]}


def test_an_s3_store_without_conditional_writes_gets_plain_ones(s3_server, caplog):
    """A store answering 501 to If-Match (an older S3-compatible server) keeps working as before conditional writes,
    with a warning once. The 501 is botocore's Stubber's: SeaweedFS takes conditional writes."""
    from botocore.stub import Stubber

    store = storage_from_config(s3_server.storage_config("old-" + uuid.uuid4().hex[:8]))
    with Stubber(store.client) as stub:
        stub.add_client_error("put_object", "NotImplemented", "A header you provided implies functionality that "
                              "is not implemented", 501)  # fmt: skip
        stub.add_response("put_object", {"ETag": '"e1"'})
        stub.add_response("put_object", {"ETag": '"e2"'})
        assert store.put_if("k", b"1", '"e0"') == '"e1"'
        assert store.put_if("k", b"2", None) == '"e2"'  # no second conditional try
        stub.assert_no_pending_responses()
    assert sum("does not take conditional writes" in r.getMessage() for r in caplog.records) == 1


def test_put_video_with_sidecar(store, tmp_path):
    f = tmp_path / "v.mp4"
    f.write_bytes(b"\x00" * 1000)
    ref = store.put_video("video_1", f, {"seed": 3, "pab": {"stats": {}}})
    assert ref.key == "videos/video_1.mp4" and ref.size_bytes == 1000
    side = store.get_json(ref.sidecar_key)
    assert side["seed"] == 3 and side["id"] == "video_1" and side["size_bytes"] == 1000
    assert store.get_bytes(ref.key) == f.read_bytes()
    if isinstance(store, LocalStorage):
        assert store.local_path(ref.key).read_bytes() == f.read_bytes() and ref.uri.startswith("file://")
        assert store.presigned_url(ref.key) is None
    else:
        assert ref.uri.startswith(f"s3://{store.bucket}/pab/test/videos/")


def test_put_video_with_images(store, tmp_path):
    """The thumbnail and spritesheet go beside the mp4 as image/jpeg objects (#16 item 1, variants)."""
    from pab.video import spritesheet_jpeg, thumbnail_jpeg

    frames = np.zeros((5, 24, 40, 3), np.uint8)
    images = {"thumbnail": thumbnail_jpeg(frames), "spritesheet": spritesheet_jpeg(frames)}
    ref = store.put_video("video_2", b"\x00" * 10, {}, images)
    keys = {v: image_key("video_2", v) for v in images}
    assert keys == {"thumbnail": "videos/video_2.thumbnail.jpg", "spritesheet": "videos/video_2.spritesheet.jpg"}
    assert store.get_json(ref.sidecar_key)["image_keys"] == keys
    for variant, key in keys.items():
        assert store.get_bytes(key) == images[variant]
    if isinstance(store, S3Storage):  # what the ingress's 307 points at: the JPEG, typed as one
        r = httpx.get(store.presigned_url(keys["thumbnail"], expires_s=60))
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content == images["thumbnail"]
    with pytest.raises(ValueError, match="variant"):
        image_key("video_2", "poster")


def test_s3_multipart_and_presigned_urls(s3_server, tmp_path):
    store = storage_from_config(s3_server.storage_config("mp-" + uuid.uuid4().hex[:8], multipart_threshold_mb=5,
                                                         multipart_chunk_mb=5))
    assert isinstance(store, S3Storage)
    big = tmp_path / "big.bin"
    data = os.urandom(12 << 20)
    big.write_bytes(data)
    store.put_file("videos/big.mp4", big, "video/mp4")
    head = store.client.head_object(Bucket=store.bucket, Key="videos/big.mp4")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # 3 parts of 5 MiB: a real multipart upload
    assert head["ContentType"] == "video/mp4"
    url = store.presigned_url("videos/big.mp4", expires_s=60)
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == data
    # Anonymous and tampered requests are refused: the server really checks signatures.
    assert httpx.get(url.split("?")[0]).status_code == 403
    assert httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403
    short = store.presigned_url("videos/big.mp4", expires_s=1)
    time.sleep(2.2)
    assert httpx.get(short).status_code == 403  # expired


def test_config_validation_and_env(monkeypatch):
    with pytest.raises(ValueError, match="bucket"):
        StorageConfig(backend="s3")
    monkeypatch.setenv("PAB_S3_BUCKET", "b1x")
    monkeypatch.setenv("PAB_S3_ENDPOINT", "http://127.0.0.1:1")
    cfg = StorageConfig.from_env(prefix="p")
    assert cfg.backend == "s3" and cfg.bucket == "b1x" and cfg.prefix == "p"
    assert cfg.endpoint_url == "http://127.0.0.1:1"
    secret = StorageConfig(backend="s3", bucket="bkt", secret_access_key="hunter2")
    assert "hunter2" not in repr(secret) and secret.to_args()["secret_access_key"] == "hunter2"


def test_the_region_comes_from_the_environment_unless_the_config_names_one(monkeypatch):
    """A Serve config's storage has no region in the manifests: AWS_REGION, which the pods set for boto3 and bulk
    jobs, must sign its download URLs too (it was us-east-1 whatever the pods said)."""
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    args = {"backend": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:1", "access_key_id": "k",
            "secret_access_key": "s"}
    assert StorageConfig(**args).region == "eu-west-1" and StorageConfig(**args, region="ap-south-1").region == \
        "ap-south-1"
    url = storage_from_config(args).presigned_url("videos/a.mp4")
    assert "%2Feu-west-1%2Fs3%2F" in url, url  # the credential scope of the signature
    monkeypatch.delenv("AWS_REGION")
    assert StorageConfig(**args).region == "us-east-1"


def test_local_files_take_the_umask_and_leave_no_temporary_file(tmp_path):
    """A video, its sidecar and any object are readable as the umask says (mkstemp made them 0600), and the
    atomic write leaves only the object behind."""
    store = storage_from_config({"backend": "local", "path": str(tmp_path / "out")})
    f = tmp_path / "v.mp4"
    f.write_bytes(b"\x00" * 100)
    old = os.umask(0o022)
    try:
        ref = store.put_video("video_1", f, {"seed": 3})
        store.put_bytes("results.parquet", b"P")
        o027 = os.umask(0o027)
        store.put_bytes("private.bin", b"Q")
    finally:
        os.umask(old)
    assert o027 == 0o022
    for key in (ref.key, ref.sidecar_key, "results.parquet"):
        assert store.local_path(key).stat().st_mode & 0o777 == 0o644, key
    assert store.local_path("private.bin").stat().st_mode & 0o777 == 0o640
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


def test_a_local_folder_is_made_by_the_first_write_and_refused_at_once_where_it_cannot_be(tmp_path):
    """Opening storage to read (a bulk dry run, a server's downloads) leaves no folder behind; the first write makes
    it. A path under a file, or in a folder nobody may write, fails when opened, with the OSError mkdir would give."""
    root = tmp_path / "a" / "b"
    store = storage_from_config({"backend": "local", "path": str(root)})
    assert not (tmp_path / "a").exists() and store.list() == [] and not store.exists("x")
    with pytest.raises(NotFound):
        store.get_bytes("x")
    store.put_bytes("x", b"1")
    assert (root / "x").read_bytes() == b"1"
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        storage_from_config({"backend": "local", "path": str(tmp_path / "file" / "out")})
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode bits
            pytest.skip("this user may write anywhere")
        with pytest.raises(PermissionError):
            storage_from_config({"backend": "local", "path": str(locked / "out")})
        assert storage_from_config({"backend": "local", "path": str(locked)}).list() == []  # exists: read it
    finally:
        locked.chmod(0o700)
