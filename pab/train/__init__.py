"""Training the `-small` models on synthetic data: `python -m pab.train --help`.

One recipe per family (`pab.train.opensora`, `latte`, `opensora_plan`) says what differs: the VAE's loss and
latent normalisation, the DiT's objective and unconditional text; `pab.train.stages` runs both stages for all.
"""

from __future__ import annotations

import importlib

RECIPES = {
    "opensora-v1.2-small": "pab.train.opensora:OpenSoraRecipe",
    "latte-1-small": "pab.train.latte:LatteRecipe",
    "opensora-plan-v1.1-small": "pab.train.opensora_plan:OpenSoraPlanRecipe",
}


def get_recipe(name: str):
    """The training recipe of a `-small` model (ValueError naming the ones there are)."""
    if name not in RECIPES:
        raise ValueError(f"{name!r} has no training recipe; available: {', '.join(RECIPES)}")
    module, cls = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), cls)()
