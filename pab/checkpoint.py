"""Where a model's weights come from.

A *source* is a local folder, `s3://bucket/prefix` (downloaded once into a local cache, see `fetch_s3`), or
a Hugging Face repository id, `owner/name[/subfolder][@revision]`, read from the local Hugging Face cache
through `huggingface_hub` (never downloaded here: `hf download owner/name` fills the cache, and
`HF_HUB_CACHE` / `HF_HOME` say where it is).

`checkpoint` is the transformer's source and the default one of every other part; `vae` and
`text_encoder` name a part's own source, so Open-Sora 1.2's DiT, VAE and T5 load from the three
repositories they are published in. A source holds a part either in a folder of the part's name
(`transformer/`, `vae/`, `text_encoder/` + `tokenizer/`: the `--checkpoint DIR` layout, and Latte-1's
repository) or, for the part it was named for, at its root (`hpcai-tech/OpenSora-STDiT-v3`,
`DeepFloyd/t5-v1_1-xxl`). A full-size model's part that its checkpoint lacks comes from the repository it
is published in when that is in the cache (`ModelSpec.hub`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pab.models import CheckpointError, get_spec, shipped_checkpoint, split_name

log = logging.getLogger(__name__)

# owner/name, then optional /sub/folder parts and an @revision (a branch, tag or commit).
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<sub>(?:/[\w.-]+)*)(?:@(?P<rev>[\w./-]+))?$")
CALIBRATION_FILE = "cache.json"  # `pab calibrate`'s step-reuse presets, in a checkpoint's folder
DOWNLOAD_LOG = "downloads.jsonl"  # in a cache's s3/ folder: one line per checkpoint `fetch_s3` downloaded into it


@dataclass(frozen=True)
class WeightSources:
    """The local folder of each part of a model, resolved."""

    transformer: Path  # config.json (optional) + *.safetensors
    vae: Path
    text_encoder: Path  # a transformers T5 folder
    tokenizer: Path | None = None  # None: in `text_encoder` or beside it (TextEncoder.from_pretrained looks)
    root: Path | None = None  # the checkpoint's folder

    @property
    def calibration(self) -> Path | None:
        """`pab calibrate`'s cache.json in the checkpoint's folder, when there is one."""
        path = self.root / CALIBRATION_FILE if self.root is not None else None
        return path if path is not None and path.is_file() else None


def default_cache_dir() -> Path:
    """Where S3 checkpoints are cached: $PAB_CACHE_DIR, else ~/.cache/pab."""
    return Path(os.environ.get("PAB_CACHE_DIR") or Path.home() / ".cache" / "pab")


def resolve_sources(
    name: str,
    checkpoint: str | Path | None = None,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
) -> WeightSources | None:
    """The folders model `name` loads its parts from; None = random weights (no checkpoint, not `-small`).

    A `-small` model without a checkpoint loads its shipped weights (pab/weights/NAME). CheckpointError
    says which part is missing and where it is published.
    """
    base, size = split_name(name)
    if checkpoint is None and size == "small":
        checkpoint = shipped_checkpoint(name)
    if checkpoint is None:
        if vae is not None or text_encoder is not None:
            raise CheckpointError("--vae and --text-encoder replace parts of a checkpoint; pass --checkpoint too "
                                  "(the transformer's source)")  # fmt: skip
        return None
    hub = get_spec(base).hub if size == "full" else {}
    root = source_folder(checkpoint)
    transformer = _part(root, "transformer", at_root=True)
    if transformer is None:
        raise CheckpointError(f"{checkpoint} holds no transformer: neither a transformer/ folder nor config.json "
                              "+ *.safetensors at its root; see README 'Checkpoints'")  # fmt: skip

    def part(what: str, own: str | Path | None) -> Path:
        if own is not None:
            folder = _part(source_folder(own), what, at_root=True)
            if folder is None:
                raise CheckpointError(f"{own} holds no {what}: neither a {what}/ folder nor a config.json at its root")
            return folder
        folder = _part(root, what, at_root=False)
        if folder is not None:
            return folder
        flag = "--" + what.replace("_", "-")
        published = hub.get(what)
        if published is not None:
            try:
                folder = source_folder(published)
            except CheckpointError as e:
                why = f"{published} (where {base} publishes its {what}) is not in the Hugging Face cache: {e}"
                raise CheckpointError(f"{checkpoint} has no {what}/ folder, and {why} Or pass {flag}.") from None
            log.info("%s: the %s from %s (Hugging Face cache)", name, what, published)
            return _part(folder, what, at_root=True) or folder
        raise CheckpointError(f"{checkpoint} has no {what}/ folder; pass {flag} (a folder or a Hugging Face repo id) "
                              "or see README 'Checkpoints'")  # fmt: skip

    vae_folder = part("vae", vae)
    text_folder = part("text_encoder", text_encoder)
    tokenizer = text_folder.parent / "tokenizer" if text_folder.name == "text_encoder" else None
    return WeightSources(transformer, vae_folder, text_folder, tokenizer if tokenizer and tokenizer.is_dir() else None,
                         root)  # fmt: skip


def _part(folder: Path, what: str, *, at_root: bool) -> Path | None:
    """`folder/what/` if there is one; else, when the part may sit at the root, `folder` if it holds one."""
    if (folder / what).is_dir():
        return folder / what
    if not at_root or not (folder / "config.json").is_file():
        return None
    if what != "text_encoder" and not any(folder.glob("*.safetensors")):
        return None
    return folder


def source_folder(source: str | Path, cache_dir: str | Path | None = None, s3: dict[str, Any] | None = None) -> Path:
    """The local folder of one source: itself, its S3 download, or its snapshot in the Hugging Face cache."""
    text = str(source)
    if text.startswith("s3://"):
        return fetch_s3(text, cache_dir, s3)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():  # a file: a checkpoint is the folder that holds the parts' files
        raise CheckpointError(f"checkpoint {path} is a file; give the folder that holds it (transformer/, vae/, ...)")
    match = HUB_ID.match(text)
    if match is None or text.startswith((".", "~")):
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    return hub_folder(match["repo"], match["sub"].strip("/"), match["rev"])


def hub_folder(repo: str, subfolder: str = "", revision: str | None = None) -> Path:
    """A repository's snapshot in the local Hugging Face cache (offline: nothing is downloaded)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    at = f"@{revision}" if revision else ""
    try:
        root = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo}{at} is neither a local folder nor a Hugging Face repository in the local cache "
            f"({constants.HF_HUB_CACHE}); fetch it with `hf download {repo}"
            f"{' --revision ' + revision if revision else ''}` (HF_HUB_CACHE or HF_HOME name another cache)."
        ) from None
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise CheckpointError(f"{repo}{at} has no folder {subfolder!r} in the cache ({root}); "
                              f"fetch it with `hf download {repo} --include '{subfolder}/*'`")  # fmt: skip
    return folder


def s3_downloads(cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The S3 downloads made into a cache (a machine's, by default), oldest first: one {"uri", "files", "bytes",
    "seconds", "pid", "at"} per `fetch_s3` that went to S3. A cache shared by a machine's ranks shows one per
    checkpoint."""
    path = Path(cache_dir or default_cache_dir()) / "s3" / DOWNLOAD_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fetch_s3(uri: str, cache_dir: str | Path | None = None, s3: dict[str, Any] | None = None) -> Path:
    """`s3://bucket/prefix` downloaded into the cache once; the local folder.

    Several ranks on one machine share the download: a file lock lets one rank fetch while the others
    wait, and a `.<name>.complete` marker written last makes later calls (and restarted workers) skip it.
    `s3` holds StorageConfig fields for the endpoint and credentials (default: the AWS environment).
    """
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise CheckpointError(f"bad checkpoint URI {uri!r}: use s3://bucket/prefix")
    dest = Path(cache_dir or default_cache_dir()) / "s3" / bucket / prefix
    marker = dest.parent / f".{dest.name}.complete"  # beside the folder: the checkpoint stays as published
    if marker.is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if marker.is_file():
            return dest
        from pab.storage import S3Storage, StorageConfig

        store = S3Storage(StorageConfig(**{**(s3 or {}), "backend": "s3", "bucket": bucket, "prefix": prefix,
                                           "create_bucket": False}))  # fmt: skip
        keys = store.list("")
        if not keys:
            raise CheckpointError(f"no objects under {uri}")
        t0 = time.perf_counter()
        size = 0
        for key in keys:
            target = dest / key
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            store.client.download_file(bucket, store._key(key), str(tmp))  # ranged, parallel for big files
            size += tmp.stat().st_size
            os.replace(tmp, target)
        marker.write_text(f"{len(keys)} files from {uri}\n")
        seconds = time.perf_counter() - t0
        # Counted only here, after the files landed, under the lock: what `s3_downloads` reads.
        with open(Path(cache_dir or default_cache_dir()) / "s3" / DOWNLOAD_LOG, "a") as f:
            f.write(json.dumps({"uri": uri, "files": len(keys), "bytes": size, "seconds": round(seconds, 3),
                                "pid": os.getpid(), "at": time.time()}) + "\n")
        log.info("downloaded %d files from %s to %s in %.1fs", len(keys), uri, dest, seconds)
    return dest
