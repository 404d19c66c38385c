"""Object storage for videos, their JSON sidecars and job records: one interface, two backends.

    store = storage_from_config({"backend": "local", "path": "outputs"})
    store = storage_from_config({"backend": "s3", "endpoint_url": "http://127.0.0.1:8333", "bucket": "videos"})
    ref = store.put_video("video_123", "/tmp/x.mp4", sidecar={...})   # videos/video_123.mp4 + .json
    store.put_video(..., images={"thumbnail": jpeg})                   # + videos/video_123.thumbnail.jpg
    store.presigned_url(ref.key)                                        # S3 only; None for a local folder

Keys are relative POSIX paths ("videos/abc.mp4"); the backend adds its root folder or bucket prefix.
Every backend is safe to use from several threads and processes: the local folder writes through a
temporary file and an atomic rename, S3 writes are single PUTs (or one multipart upload) per object.
A conditional write (`put_if`) replaces an object only if it is still the version read (`get_versioned`):
where two processes may act on one object at once (two replicas taking over one job), exactly one wins.

S3 credentials come from the usual AWS environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, an
instance role, ...) unless the config names them. The config is a plain pydantic model so it can be
sent to Ray actors, which rebuild the backend on their side (`storage_from_config`).

It lives in `pab` because `actors`, `cluster` and `jobs` all store through it and layers import downward only;
it knows nothing of Ray.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

VIDEO_PREFIX = "videos/"
_CHUNK = 1 << 20
log = logging.getLogger(__name__)


class NotFound(KeyError):
    """No object under this key."""


class ObjectChanged(RuntimeError):
    """A conditional write (`Storage.put_if`) found the object changed, created or removed since it was read."""


class StorageUnavailable(RuntimeError):
    """The object store failed (unreachable, read-only, full, refusing the credentials): not a missing key.

    The message says which store and what to check. Callers keep the work and retry once it takes writes.
    """


def storage_failure(e: BaseException) -> bool:
    """Whether `e` is the object store failing, as either backend raises it (a missing key is not)."""
    if isinstance(e, NotFound):
        return False
    if isinstance(e, (StorageUnavailable, OSError)):  # a local folder; also sockets, timeouts
        return True
    try:
        from boto3.exceptions import Boto3Error  # upload_file wraps a ClientError in S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return False
    return isinstance(e, (BotoCoreError, ClientError, Boto3Error))


def unavailable(config: StorageConfig | dict[str, Any], what: str, e: BaseException) -> StorageUnavailable:
    """`e`, a backend error while trying to `what`, as a StorageUnavailable naming the store and what to check."""
    if isinstance(e, StorageUnavailable):
        return e
    c = config if isinstance(config, StorageConfig) else StorageConfig(**config)
    detail = " ".join(str(e).split())[:300] or "no detail"
    if c.backend == "s3":
        where = f"S3 bucket {c.bucket!r} at {c.endpoint_url or 'AWS'}"
        check = "the endpoint is up and reachable, the bucket exists and the credentials may read and write it"
    else:
        where = f"the local folder {Path(c.path).expanduser().resolve()}"
        check = "the folder is mounted and writable by the service's user and its disk has space"
    return StorageUnavailable(f"storage unavailable: could not {what} in {where} ({type(e).__name__}: {detail}). "
                              f"Check that {check}.")


@contextlib.contextmanager
def storage_errors(config: StorageConfig | dict[str, Any], what: str) -> Iterator[None]:
    """Inside the block, a backend's own failure becomes a StorageUnavailable naming `what` (`unavailable`);
    NotFound and every other error pass unchanged."""
    try:
        yield
    except StorageUnavailable:
        raise
    except Exception as e:
        if not storage_failure(e):
            raise
        raise unavailable(config, what, e) from e


def _env_region(env: Any) -> str:
    """The region boto3 would take from the environment: a deployment sets AWS_REGION once for every part."""
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"


class StorageConfig(BaseModel):
    """Where objects live. `backend="local"` needs `path`; `backend="s3"` needs `bucket`."""

    backend: Literal["local", "s3"] = Field("local", description="local folder or S3-compatible object store")
    path: str = Field("outputs", description="local backend: root folder (created by the first write)")
    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://seaweedfs:8333; None = AWS")
    public_endpoint_url: str | None = Field(
        None, description="S3 endpoint that clients outside the cluster reach; used only to sign download URLs"
    )
    bucket: str | None = Field(None, description="S3 bucket")
    prefix: str = Field("", description="S3 key prefix, e.g. 'pab/prod'")
    region: str = Field(default_factory=lambda: _env_region(os.environ), description="S3 region (SigV4 signs "
                        "it); default: AWS_REGION or AWS_DEFAULT_REGION where the config is read, else us-east-1")
    access_key_id: SecretStr | None = Field(None, description="S3 key id; None = AWS environment / instance role")
    secret_access_key: SecretStr | None = Field(None, description="S3 secret; None = AWS environment")
    create_bucket: bool = Field(False, description="create the bucket if it does not exist")
    presign_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600, description="lifetime of download URLs")
    multipart_threshold_mb: int = Field(16, ge=5, description="files at least this large upload in parts")
    multipart_chunk_mb: int = Field(16, ge=5, description="part size of multipart uploads (S3 minimum is 5 MiB)")

    @model_validator(mode="after")
    def _check(self) -> "StorageConfig":
        if self.backend == "s3" and not self.bucket:
            raise ValueError("storage backend 's3' needs a bucket")
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> "StorageConfig":
        """Config from PAB_S3_* / PAB_OUTPUT_DIR variables; S3 when PAB_S3_BUCKET is set."""
        env = os.environ
        values: dict[str, Any] = {}
        if env.get("PAB_S3_BUCKET"):
            values.update(
                backend="s3",
                bucket=env["PAB_S3_BUCKET"],
                endpoint_url=env.get("PAB_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL") or None,
                public_endpoint_url=env.get("PAB_S3_PUBLIC_ENDPOINT") or None,
                prefix=env.get("PAB_S3_PREFIX", ""),
                region=_env_region(env),
            )
        elif env.get("PAB_OUTPUT_DIR"):
            values.update(backend="local", path=env["PAB_OUTPUT_DIR"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_args(self) -> dict[str, Any]:
        """A dict that rebuilds this config in another process (secrets included: never log it)."""
        d = self.model_dump()
        for k in ("access_key_id", "secret_access_key"):
            if d[k] is not None:
                d[k] = d[k].get_secret_value()
        return d


@dataclass(frozen=True)
class VideoRef:
    """Where a stored video and its sidecar are."""

    key: str
    sidecar_key: str
    uri: str
    size_bytes: int


def video_keys(video_id: str) -> tuple[str, str]:
    """(mp4 key, sidecar key) of a video id."""
    return f"{VIDEO_PREFIX}{video_id}.mp4", f"{VIDEO_PREFIX}{video_id}.json"


IMAGE_VARIANTS = ("thumbnail", "spritesheet")  # the still images stored beside a video, as JPEGs


def image_key(video_id: str, variant: str) -> str:
    """Key of a video's still image: `videos/<id>.thumbnail.jpg` or `videos/<id>.spritesheet.jpg`."""
    if variant not in IMAGE_VARIANTS:
        raise ValueError(f"unknown image variant {variant!r}; one of {IMAGE_VARIANTS}")
    return f"{VIDEO_PREFIX}{video_id}.{variant}.jpg"


def _check_key(key: str) -> str:
    p = PurePosixPath(key)
    if not key or p.is_absolute() or ".." in p.parts or key.endswith("/"):
        raise ValueError(f"bad storage key {key!r}: use a relative path like 'videos/abc.mp4'")
    return str(p)


class Storage(ABC):
    """The interface every backend implements."""

    config: StorageConfig

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Write one object (replacing it)."""

    @abstractmethod
    def put_file(self, key: str, path: str | Path, content_type: str | None = None) -> None:
        """Upload a local file; large files go in parts."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's content; NotFound if missing."""

    @abstractmethod
    def iter_bytes(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """The object's content in chunks (for streaming responses); NotFound if missing."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes; NotFound if missing."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; no error if it is already gone."""

    @abstractmethod
    def list(self, prefix: str = "", start_after: str | None = None, limit: int | None = None) -> list[str]:
        """Keys under `prefix` in ascending order, strictly after `start_after`, at most `limit`."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """A URI naming the object (file:///... or s3://bucket/...)."""

    def presigned_url(self, key: str, expires_s: int | None = None) -> str | None:
        """A time-limited download URL, or None when the backend has none (local folder)."""
        return None

    def local_path(self, key: str) -> Path | None:
        """The file behind the key when the backend is a local folder, else None."""
        return None

    # ------------------------------------------------------------------ helpers on top

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, _json_bytes(obj), "application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's content and its version (an opaque tag, S3's ETag); NotFound if missing."""

    @abstractmethod
    def put_if(self, key: str, data: bytes, version: str | None, content_type: str | None = None) -> str:
        """Write the object only if it is still at `version` (None: only if there is none yet), atomically with
        respect to every other write of it; ObjectChanged otherwise. Returns the new version."""

    def get_json_versioned(self, key: str) -> tuple[Any, str]:
        data, version = self.get_versioned(key)
        return json.loads(data), version

    def put_json_if(self, key: str, obj: Any, version: str | None) -> str:
        return self.put_if(key, _json_bytes(obj), version, "application/json")

    def put_video(self, video_id: str, video: bytes | str | Path, sidecar: dict[str, Any],
                  images: dict[str, bytes] | None = None) -> VideoRef:
        """Store `videos/<id>.mp4` (bytes or a file), its JPEG `images` by variant
        (`videos/<id>.thumbnail.jpg`, ...) and its `videos/<id>.json` sidecar, sidecar last.

        The sidecar is written after the video and images so a reader that finds the sidecar finds them too.
        """
        key, side = video_keys(video_id)
        image_keys = {v: image_key(video_id, v) for v in (images or {})}
        if isinstance(video, (bytes, bytearray)):
            self.put_bytes(key, bytes(video), "video/mp4")
            n = len(video)
        else:
            self.put_file(key, video, "video/mp4")
            n = Path(video).stat().st_size
        for variant, data in (images or {}).items():
            self.put_bytes(image_keys[variant], data, "image/jpeg")
        extra = {"image_keys": image_keys} if image_keys else {}
        self.put_json(side, {**sidecar, "id": video_id, "video_key": key, "size_bytes": n, **extra})
        return VideoRef(key=key, sidecar_key=side, uri=self.uri(key), size_bytes=n)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode()


# ----------------------------------------------------------------------------------------------------
# Local folder
# ----------------------------------------------------------------------------------------------------


def _check_creatable(root: Path) -> None:
    """Raise the OSError creating `root` would, now: it, or the nearest folder above it that exists, is a file, or
    that folder is not writable where `root` has yet to be made."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
    if existing != root and not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot create {root} in a folder not writable", str(existing))


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` (flock on the folder itself: no lock file, and it holds across processes),
    so a conditional write's compare and replace are one step with respect to every other write in the folder."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _version(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()  # a content tag, as S3's ETag of one PUT


class LocalStorage(Storage):
    """Objects are files under `config.path`; writes are atomic (temporary file + rename). A file's version is
    the MD5 of its content; conditional writes compare it under a lock on the file's folder."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self.root = Path(config.path).expanduser().resolve()
        _check_creatable(self.root)  # made by the first write: opening it to read (a dry run) leaves no folder

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _atomic_write(self, key: str, write, check: Callable[[Path], None] | None = None) -> None:
        """Write through a temporary file, then rename it over the key's file under the folder's lock, after
        `check(dest)` (a conditional write's compare) passes."""
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL on a fresh name, as mkstemp, but mode 0o666 so the umask decides (mkstemp's 0600 made every
        # video, sidecar and results table readable by their owner only).
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            with _folder_lock(dest.parent):
                if check is not None:
                    check(dest)
                os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | Path, content_type: str | None = None) -> None:
        def copy(f: BinaryIO) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, _CHUNK)

        self._atomic_write(key, copy)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(key) from None

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)  # the rename is atomic: these bytes are one version's, whole
        return data, _version(data)

    def put_if(self, key: str, data: bytes, version: str | None, content_type: str | None = None) -> str:
        def unchanged(dest: Path) -> None:
            try:
                current: str | None = _version(dest.read_bytes())
            except FileNotFoundError:
                current = None
            if current != version:
                raise ObjectChanged(f"{key} is {'gone' if current is None else 'at another version'}, not at "
                                    f"{version}" if version is not None else f"{key} exists already")

        self._atomic_write(key, lambda f: f.write(data), check=unchanged)
        return _version(data)

    def iter_bytes(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFound(key) from None

        def chunks() -> Iterator[bytes]:
            with f:
                while block := f.read(chunk_size):
                    yield block

        return chunks()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if not path.parent.is_dir():
            return
        with _folder_lock(path.parent):  # not between a conditional write's compare and its rename
            path.unlink(missing_ok=True)

    def list(self, prefix: str = "", start_after: str | None = None, limit: int | None = None) -> list[str]:
        # Walk only the folder that holds the prefix; names starting with "." are temporary files.
        base = self.root / (prefix.rsplit("/", 1)[0] if "/" in prefix else "")
        if not base.is_dir():
            return []
        keys = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                k = p.relative_to(self.root).as_posix()
                if k.startswith(prefix) and (start_after is None or k > start_after):
                    keys.append(k)
        keys.sort()
        return keys if limit is None else keys[:limit]

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


# ----------------------------------------------------------------------------------------------------
# S3 (boto3)
# ----------------------------------------------------------------------------------------------------


class S3Storage(Storage):
    """Objects in `bucket` under `prefix`; path-style addressing so any S3-compatible server works."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix.strip("/") + "/" if config.prefix.strip("/") else ""
        self._lock = threading.Lock()
        self._client = None
        self._public_client = None
        self._unconditional = False  # the store refused conditional writes (501): plain PUTs from then on
        if config.create_bucket:
            self.ensure_bucket()

    def _make_client(self, endpoint_url: str | None):
        import boto3
        from botocore.config import Config

        c = self.config
        kwargs: dict[str, Any] = {}
        if c.access_key_id is not None:
            kwargs["aws_access_key_id"] = c.access_key_id.get_secret_value()
        if c.secret_access_key is not None:
            kwargs["aws_secret_access_key"] = c.secret_access_key.get_secret_value()
        cfg = Config(
            s3={"addressing_style": "path"}, signature_version="s3v4",
            retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60,
        )
        # A session per client: boto3's default session is not thread-safe to create clients from.
        return boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=c.region, config=cfg, **kwargs
        )

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                self._client = self._make_client(self.config.endpoint_url)
            return self._client

    @property
    def public_client(self):
        if not self.config.public_endpoint_url:
            return self.client
        with self._lock:
            if self._public_client is None:
                self._public_client = self._make_client(self.config.public_endpoint_url)
            return self._public_client

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    @staticmethod
    def _missing(e: Exception) -> bool:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return obj["Body"].read(), obj["ETag"]
        except ClientError as e:
            if self._missing(e):
                raise NotFound(key) from None
            raise

    def put_if(self, key: str, data: bytes, version: str | None, content_type: str | None = None) -> str:
        """S3's conditional PUT (If-Match / If-None-Match: AWS since 2024, SeaweedFS, MinIO, R2). A store that
        answers 501 to them gets a plain PUT, with a warning once: it works as before conditional writes."""
        from botocore.exceptions import ClientError

        extra = {"ContentType": content_type} if content_type else {}
        if not self._unconditional:
            cond = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
            try:
                return self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **cond,
                                              **extra)["ETag"]  # fmt: skip
            except ClientError as e:
                err, status = e.response.get("Error", {}), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = err.get("Code", "")
                # 412: not at that version (or, for If-Match, gone: AWS may answer 404 instead); 409: a concurrent
                # conditional write of the same key won.
                if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict") or (
                        version is not None and self._missing(e)):
                    raise ObjectChanged(f"{key} changed since it was read ({code or status})") from None
                if status != 501 and code != "NotImplemented":
                    raise
                self._unconditional = True
                log.warning("the S3 store at %s does not take conditional writes (If-Match, If-None-Match): two "
                            "processes taking over one job at once may both run it", self.config.endpoint_url or "AWS")
        return self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)["ETag"]

    def put_file(self, key: str, path: str | Path, content_type: str | None = None) -> None:
        from boto3.s3.transfer import TransferConfig

        mb = 1 << 20
        transfer = TransferConfig(
            multipart_threshold=self.config.multipart_threshold_mb * mb,
            multipart_chunksize=self.config.multipart_chunk_mb * mb,
            max_concurrency=4,
        )
        extra = {"ContentType": content_type} if content_type else None
        self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs=extra, Config=transfer)

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as e:
            if self._missing(e):
                raise NotFound(key) from None
            raise

    def iter_bytes(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as e:
            if self._missing(e):
                raise NotFound(key) from None
            raise
        return body.iter_chunks(chunk_size)

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as e:
            if self._missing(e):
                raise NotFound(key) from None
            raise

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except NotFound:
            return False

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str = "", start_after: str | None = None, limit: int | None = None) -> list[str]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if start_after is not None:
            kwargs["StartAfter"] = self.prefix + start_after
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(**kwargs):
            for obj in page.get("Contents", []):
                keys.append(obj["Key"][len(self.prefix):])
                if limit is not None and len(keys) >= limit:
                    return keys
        return keys

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def presigned_url(self, key: str, expires_s: int | None = None) -> str | None:
        return self.public_client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=int(expires_s or self.config.presign_expiry_s),
        )


def storage_from_config(config: StorageConfig | dict[str, Any] | None = None) -> Storage:
    """Build the backend a config names (None: from the environment, default a local ./outputs)."""
    if config is None:
        config = StorageConfig.from_env()
    elif isinstance(config, dict):
        config = StorageConfig(**config)
    return S3Storage(config) if config.backend == "s3" else LocalStorage(config)
