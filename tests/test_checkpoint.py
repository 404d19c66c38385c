"""Weights from where users keep them: each part from its own Hugging Face repository, read from a cache that
`huggingface_hub` laid out itself (downloaded from a Hub on loopback, which is shut down before any load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, snapshot_download
from safetensors.torch import load_file
from support.fakehub import FakeHub, folder_files

from pab.checkpoint import resolve_sources, source_folder
from pab.models import WEIGHTS_DIR, CheckpointError
from pab.pipeline import GenerationRequest, Pipeline

NAME = "opensora-v1.2-small"
SHIPPED = WEIGHTS_DIR / NAME
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A Hugging Face cache holding the shipped small model split as Open-Sora 1.2 publishes its parts (DiT,
    VAE, T5 each at a repository's root), the whole layout under a subfolder of one repository, and a stand-in
    for the published Open-Sora VAE repository."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repos = {
        "test-org/stdit-small": folder_files(SHIPPED / "transformer"),
        "test-org/vae-small": folder_files(SHIPPED / "vae"),
        "test-org/t5-small": {**folder_files(SHIPPED / "text_encoder"), **folder_files(SHIPPED / "tokenizer")},
        "test-org/bundle": {k: v for part in ("transformer", "vae", "text_encoder", "tokenizer")
                            for k, v in folder_files(SHIPPED / part, f"small/{part}/").items()},  # fmt: skip
        "hpcai-tech/OpenSora-VAE-v1.2": {"config.json": b"{}", "model.safetensors": b"stand-in"},
    }
    with FakeHub(repos) as hub:
        for repo in repos:
            snapshot_download(repo, endpoint=hub.url, cache_dir=cache)
    return cache


@pytest.fixture
def hf_cache(cache, monkeypatch) -> Path:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE sets at import
    return cache


def render(pipe: Pipeline) -> torch.Tensor:
    return pipe.generate(GenerationRequest(model=NAME, prompt="a red circle moving right", steps=2, seed=3)).latents


def test_three_repositories_load_as_the_shipped_folder(hf_cache):
    sources = resolve_sources(NAME, "test-org/stdit-small", vae="test-org/vae-small", text_encoder="test-org/t5-small")
    snapshots = hf_cache / "models--test-org--stdit-small" / "snapshots"
    assert sources.transformer.parent == snapshots and sources.transformer.is_relative_to(hf_cache)
    assert sources.vae.is_relative_to(hf_cache / "models--test-org--vae-small")
    assert sources.text_encoder.is_relative_to(hf_cache / "models--test-org--t5-small") and sources.tokenizer is None
    hub = Pipeline.from_name(NAME, device="cpu", checkpoint="test-org/stdit-small", vae="test-org/vae-small",
                             text_encoder="test-org/t5-small")  # fmt: skip
    assert not hub.random_weights
    assert torch.equal(render(hub), render(Pipeline.from_name(NAME, device="cpu")))


def test_subfolder_and_revision_of_one_repository(hf_cache):
    sources = resolve_sources(NAME, "test-org/bundle/small@main")
    assert sources.transformer.parts[-2:] == ("small", "transformer")
    assert sources.tokenizer == sources.text_encoder.parent / "tokenizer"
    # A part's own source may be a plain folder beside a repository.
    assert resolve_sources(NAME, "test-org/bundle/small", vae=str(SHIPPED)).vae == SHIPPED / "vae"
    bundle = Pipeline.from_name(NAME, device="cpu", checkpoint="test-org/bundle/small@main")
    assert torch.equal(render(bundle), render(Pipeline.from_name(NAME, device="cpu", checkpoint=SHIPPED)))


def test_what_is_not_there_says_how_to_get_it(hf_cache, tmp_path):
    with pytest.raises(CheckpointError, match=r"in the local cache \(.*`hf download test-org/nothing`"):
        source_folder("test-org/nothing")
    with pytest.raises(CheckpointError, match=r"--revision v2"):
        source_folder("test-org/stdit-small@v2")
    with pytest.raises(CheckpointError, match=r"no folder 'large'.*--include 'large/\*'"):
        source_folder("test-org/bundle/large")
    with pytest.raises(CheckpointError, match="does not exist"):
        source_folder("./runs/nothing")
    with pytest.raises(CheckpointError, match="pass --checkpoint too"):
        resolve_sources("opensora-v1.2-tiny", None, vae="test-org/vae-small")
    with pytest.raises(CheckpointError, match="holds no transformer"):
        resolve_sources(NAME, str(tmp_path))


def test_a_full_model_takes_a_missing_part_from_where_it_is_published(hf_cache, tmp_path):
    """`--checkpoint` of Open-Sora 1.2's DiT alone: its VAE comes from hpcai-tech/OpenSora-VAE-v1.2 when that is in
    the cache; its T5 (DeepFloyd/t5-v1_1-xxl) is not, and the error names the repository and the flag."""
    dit = tmp_path / "stdit"
    dit.mkdir()
    (dit / "config.json").write_text("{}")
    (dit / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"DeepFloyd/t5-v1_1-xxl.*not in the Hugging Face cache.*--text-encoder"):
        resolve_sources("opensora-v1.2", str(dit))
    sources = resolve_sources("opensora-v1.2", str(dit), text_encoder="test-org/t5-small")
    assert sources.transformer == dit
    assert sources.vae.is_relative_to(hf_cache / "models--hpcai-tech--OpenSora-VAE-v1.2")
    # Sizes trained here have no published parts: the message says to pass the flag.
    with pytest.raises(CheckpointError, match="no vae/ folder; pass --vae"):
        resolve_sources("opensora-v1.2-tiny", str(dit))


def test_pab_generate_with_hub_ids(cache, tmp_path):
    """The CLI as a user runs it: HF_HUB_CACHE in the environment, offline, three repository ids."""
    out = tmp_path / "hub.mp4"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pab.cli", "generate", "--model", NAME, "--prompt", "a red circle moving right",
           "--steps", "2", "--seed", "3", "--device", "cpu", "--quiet", "--output", str(out),
           "--save-latents", str(tmp_path / "hub.safetensors"), "--checkpoint", "test-org/stdit-small",
           "--vae", "test-org/vae-small", "--text-encoder", "test-org/t5-small"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "VAE from test-org/vae-small, text encoder from test-org/t5-small" in done.stdout
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["checkpoint"] == "test-org/stdit-small" and sidecar["weights"]["vae"] == "test-org/vae-small"
    shipped = render(Pipeline.from_name(NAME, device="cpu"))
    assert torch.equal(load_file(str(tmp_path / "hub.safetensors"))["latents"], shipped)
    bad = subprocess.run([*cmd[:-6], "--checkpoint", "test-org/absent"], capture_output=True, text=True,
                         timeout=300, env=env)  # fmt: skip
    assert bad.returncode != 0 and "hf download test-org/absent" in bad.stderr and "Traceback" not in bad.stderr
