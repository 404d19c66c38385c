"""One adapter per model family: what differs between Open-Sora 1.2, Latte-1 and Open-Sora-Plan v1.1 when a
pipeline loads and runs them (VAE loading, text conditioning, the transformer's call). The models themselves
stay plain modules in pab/models; a new family is one file here plus a line in FAMILIES."""

from __future__ import annotations

from pab.families.base import Family, trim_text, truncated_text
from pab.families.latte import Latte1
from pab.families.opensora import OpenSora12
from pab.families.opensora_plan import OpenSoraPlan11
from pab.models import MODEL_SPECS, get_spec

FAMILIES: dict[str, Family] = {f.name: f for f in (OpenSora12(), Latte1(), OpenSoraPlan11())}
assert set(FAMILIES) == set(MODEL_SPECS), "every model in the registry has a family adapter"


def get_family(name: str) -> Family:
    """The adapter of a model name of any size ("latte-1-tiny" -> Latte1)."""
    return FAMILIES[get_spec(name).name]  # get_spec says what is wrong with a name that is no model


__all__ = ["FAMILIES", "Family", "get_family", "trim_text", "truncated_text"]
