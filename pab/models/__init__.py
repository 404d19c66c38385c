"""Model registry: every DiT and VAE by name, full size, `-small` (trained here, shipped) or `-tiny`.

    model = pab.models.build("opensora-v1.2", device="meta")          # full size, no memory
    model = pab.models.build("latte-1-tiny", dtype=torch.float32)     # small, same architecture

`MODEL_SPECS` describes each text-to-video model: its transformer, VAE, text encoder, sampler and
the defaults the official pipelines use. Modules are imported lazily so `pab models` stays fast.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A checkpoint does not match the model: missing, unexpected or mis-shaped entries."""


def load_state_dict_strict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], ignore_prefixes: tuple[str, ...] = (), source: str = ""
) -> None:
    """Load `state_dict` into `model`; every key must match by name and shape (except `ignore_prefixes`)."""
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        where = f" ({source})" if source else ""
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_short(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_short(shapes)}")
        raise CheckpointError(
            f"checkpoint does not fit {type(model).__name__}{where}: " + "; ".join(parts)
            + ". Check that the file is the published checkpoint for this model and size."
        )
    model.load_state_dict(state_dict, strict=True, assign=any(p.is_meta for p in model.parameters()))


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentSpec:
    """Where a module lives: `module:builder` called with a size name ("full", "small" or "tiny")."""

    module: str
    cls: str
    config_cls: str

    def _module(self):
        return importlib.import_module(f"pab.models.{self.module}")

    def config(self, size: str, config_file: Path | None = None, **overrides: Any) -> Any:
        """The official config.json when given and present, else this size's config."""
        mod = self._module()
        config_cls = getattr(mod, self.config_cls)
        if config_file is not None and config_file.is_file():
            return config_cls.from_dict(json.loads(config_file.read_text()))
        if size not in mod.SIZES:
            raise ValueError(f"{self.cls} has no size {size!r}; known: {sorted(mod.SIZES)}")
        return config_cls(**{**mod.SIZES[size], **overrides})

    def build(self, size: str, **overrides: Any) -> nn.Module:
        return getattr(self._module(), self.cls)(self.config(size, **overrides))

    def load(self, size: str, folder: Path, device: torch.device | str) -> nn.Module:
        """Build from `folder/config.json` (or the size's config) and load `folder/*.safetensors` strictly.

        Built on the target device, not meta, so computed non-persistent tables are real tensors. A
        module with its own `load_checkpoint` (e.g. one that must skip training-only entries) uses it.
        """
        from safetensors.torch import load_file

        if not folder.is_dir():
            raise CheckpointError(f"{folder.parent} has no {folder.name}/ folder; see README 'Checkpoints'")
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no .safetensors file in {folder}; see README 'Checkpoints' for the layout")
        with torch.device(device):
            model = getattr(self._module(), self.cls)(self.config(size, folder / "config.json"))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        loader = getattr(model, "load_checkpoint", None)
        if loader is not None:
            loader(state, source=str(folder))
        else:
            load_state_dict_strict(model, state, source=str(folder))
        return model


@dataclass(frozen=True)
class Defaults:
    num_frames: int
    height: int
    width: int
    fps: int
    steps: int
    guidance_scale: float


@dataclass(frozen=True)
class ModelSpec:
    """A text-to-video model: its parts and the settings of its official pipeline."""

    name: str
    description: str
    transformer: ComponentSpec
    vae: str  # a VAE name in VAE_SPECS
    sampler: str
    text_max_length: int
    defaults: Defaults
    tiny_defaults: Defaults
    prompt_suffix: str = ""
    paper_reference: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # The `-small` size, trained here on synthetic clips (`python -m pab.train`); None until it exists.
    small_defaults: Defaults | None = None
    small_text_max_length: int = 32
    # Where each part of the full size is published on the Hugging Face Hub ("owner/name[/subfolder]"): a part
    # a checkpoint lacks loads from there when it is in the local cache (pab/checkpoint.py).
    hub: dict[str, str] = field(default_factory=dict)

    @property
    def sizes(self) -> tuple[str, ...]:
        return ("full", "small", "tiny") if self.small_defaults is not None else ("full", "tiny")

    def defaults_for(self, size: str) -> Defaults:
        """The request defaults of one size ("full" = the official pipeline's)."""
        d = {"full": self.defaults, "tiny": self.tiny_defaults, "small": self.small_defaults}.get(size)
        if d is None:
            raise ValueError(f"{self.name} has no {size!r} size; sizes: {', '.join(self.sizes)}")
        return d

    def text_max_length_for(self, size: str) -> int:
        """Text tokens the encoder keeps: the official length, the small T5's, or 64 for the byte-level tiny one."""
        return {"full": self.text_max_length, "small": self.small_text_max_length}.get(size, 64)


VAE_SPECS: dict[str, ComponentSpec] = {
    "opensora-vae-v1.2": ComponentSpec("opensora_vae", "OpenSoraVAE", "OpenSoraVAEConfig"),
    "opensora-plan-vae-v1.1": ComponentSpec("opensora_plan_vae", "CausalVAE", "CausalVAEConfig"),
}

MODEL_SPECS: dict[str, ModelSpec] = {
    "opensora-v1.2": ModelSpec(
        name="opensora-v1.2",
        description="Open-Sora 1.2 STDiT3-XL/2 (hpcai-tech/OpenSora-STDiT-v3), rectified flow",
        transformer=ComponentSpec("stdit3", "STDiT3", "STDiT3Config"),
        vae="opensora-vae-v1.2",
        sampler="rflow",
        text_max_length=300,
        defaults=Defaults(num_frames=51, height=480, width=854, fps=24, steps=30, guidance_scale=7.0),
        tiny_defaults=Defaults(num_frames=17, height=64, width=96, fps=8, steps=8, guidance_scale=7.0),
        prompt_suffix=" aesthetic score: 6.5.",
        paper_reference="480p (480x854) 51 frames, 30 steps, CFG 7.0",
        small_defaults=Defaults(num_frames=17, height=64, width=64, fps=8, steps=30, guidance_scale=4.0),
        hub={"transformer": "hpcai-tech/OpenSora-STDiT-v3", "vae": "hpcai-tech/OpenSora-VAE-v1.2",
             "text_encoder": "DeepFloyd/t5-v1_1-xxl"},
    ),
    "latte-1": ModelSpec(
        name="latte-1",
        description="Latte-1 (maxin-cn/Latte-1, diffusers layout), DDIM",
        transformer=ComponentSpec("latte", "LatteTransformer3DModel", "LatteConfig"),
        vae="sd-vae",
        sampler="ddim",
        text_max_length=120,
        defaults=Defaults(num_frames=16, height=512, width=512, fps=8, steps=50, guidance_scale=7.5),
        tiny_defaults=Defaults(num_frames=8, height=64, width=64, fps=8, steps=8, guidance_scale=7.5),
        paper_reference="16x512x512, DDIM 50 steps, CFG 7.5",
        small_defaults=Defaults(num_frames=16, height=64, width=64, fps=8, steps=50, guidance_scale=4.0),
        hub={"transformer": "maxin-cn/Latte-1/transformer", "vae": "maxin-cn/Latte-1/vae",
             "text_encoder": "maxin-cn/Latte-1/text_encoder"},
    ),
    "opensora-plan-v1.1": ModelSpec(
        name="opensora-plan-v1.1",
        description="Open-Sora-Plan v1.1.0 LatteT2V 65x512x512 (LanguageBind/Open-Sora-Plan-v1.1.0), PNDM",
        transformer=ComponentSpec("opensora_plan", "LatteT2V", "LatteT2VConfig"),
        vae="opensora-plan-vae-v1.1",
        sampler="pndm",
        text_max_length=300,
        defaults=Defaults(num_frames=65, height=512, width=512, fps=24, steps=150, guidance_scale=7.5),
        tiny_defaults=Defaults(num_frames=17, height=64, width=64, fps=8, steps=8, guidance_scale=7.5),
        paper_reference="65x512x512, PNDM 150 steps (159 model calls), CFG 7.5",
        small_defaults=Defaults(num_frames=17, height=64, width=64, fps=8, steps=150, guidance_scale=4.0),
        hub={"transformer": "LanguageBind/Open-Sora-Plan-v1.1.0/65x512x512",
             "vae": "LanguageBind/Open-Sora-Plan-v1.1.0/vae", "text_encoder": "DeepFloyd/t5-v1_1-xxl"},
    ),
}

MODEL_NAMES = sorted(MODEL_SPECS)
# A VAE has a `-small` size where a model that uses it has one.
_VAE_SIZES = {v: sorted({s for m in MODEL_SPECS.values() if m.vae == v for s in m.sizes}) for v in VAE_SPECS}


def sized_name(base: str, size: str) -> str:
    """The name of one size of a model or VAE, split_name's inverse: ('latte-1', 'tiny') -> 'latte-1-tiny'."""
    return base if size == "full" else f"{base}-{size}"


_MODEL_NAMES_SIZED = sorted(sized_name(n, s) for n, m in MODEL_SPECS.items() for s in m.sizes)
_VAE_NAMES_SIZED = sorted(sized_name(n, s) for n, sizes in _VAE_SIZES.items() for s in sizes)
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
"""Shipped checkpoints of the `-small` models, one folder each in the `--checkpoint` layout."""


def split_name(name: str) -> tuple[str, str]:
    """'latte-1-tiny' -> ('latte-1', 'tiny'), 'opensora-v1.2-small' -> (.., 'small'), 'latte-1' -> (.., 'full')."""
    base, size = name, "full"
    for s in ("tiny", "small"):
        if name.endswith(f"-{s}"):
            base, size = name[: -len(s) - 1], s
    known = MODEL_SPECS[base].sizes if base in MODEL_SPECS else _VAE_SIZES.get(base, ())
    if size not in known:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_MODEL_NAMES_SIZED)} "
                         f"(and their VAEs: {', '.join(_VAE_NAMES_SIZED)})")
    return base, size


def shipped_checkpoint(name: str) -> Path:
    """The shipped weights of a `-small` model (pab/weights/NAME); CheckpointError when they are not there."""
    base, size = split_name(name)
    folder = WEIGHTS_DIR / f"{base}-{size}"
    if size != "small" or not (folder / "transformer").is_dir():
        raise CheckpointError(
            f"{name} has no shipped weights in {folder}; train them with "
            f"`python -m pab.train --model {base}-small` or pass --checkpoint DIR"
        )
    return folder


def training_summary(folder: Path) -> str:
    """One line on what a checkpoint trained here learned from (its training.json), or why it cannot say."""
    try:
        doc = json.loads((Path(folder) / "training.json").read_text())
    except (OSError, ValueError):
        return "no training.json beside the weights"
    dit = doc.get("stages", {}).get("dit", {})
    steps, run = 0, dit
    while isinstance(run, dict) and "steps" in run:  # a run continued from another records it under init.dit
        steps += run["steps"]
        run = (run.get("init") or {}).get("dit") if isinstance(run.get("init"), dict) else None
    how = f"; {steps} DiT steps on {dit.get('device', '?')}" if steps else ""
    return f"trained on {doc.get('data', '?')}{how}"


def get_spec(name: str) -> ModelSpec:
    base, _ = split_name(name)
    if base not in MODEL_SPECS:
        raise ValueError(f"{name!r} is a VAE, not a text-to-video model; models: {', '.join(MODEL_NAMES)}")
    return MODEL_SPECS[base]


@contextlib.contextmanager
def _default_device(device: str | torch.device | None) -> Iterator[None]:
    if device is None:
        yield
    else:
        with torch.device(device):
            yield


def build(
    name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None, seed: int | None = 0
) -> nn.Module:
    """Build a DiT or VAE by name ("latte-1", "opensora-v1.2-tiny", "opensora-vae-v1.2", ...).

    Weights are random. With `seed` set they are the same in every process (ranks of a
    sequence-parallel group must hold identical weights). On the `meta` device nothing is allocated.
    """
    base, size = split_name(name)
    component = MODEL_SPECS[base].transformer if base in MODEL_SPECS else VAE_SPECS[base]
    with torch.random.fork_rng(devices=[]), _default_device(device):
        if seed is not None:
            torch.manual_seed(seed)
        model = component.build(size)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def randomize_weights(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Draw every learned weight from N(0, std) (norm scales around 1), reproducibly.

    The official initialisations zero the output layers (adaLN-Zero), so a freshly built DiT predicts
    zero everywhere; tests and demos with random weights use this instead to get real signal through
    every block. Fixed tables (RoPE frequencies) are left as computed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "freqs" in name or p.is_meta:
                continue
            noise = torch.randn(p.shape, generator=gen) * std
            if name.endswith("norm.weight") or name.endswith("_norm.weight"):
                noise += 1.0
            p.copy_(noise.to(p.dtype))
    return model
