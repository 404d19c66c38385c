"""The one rule for a request without a seed. Each edge that takes requests (the CLI, the HTTP ingress, a GPU
group driven directly, a single worker, the pipeline) fills a missing seed with `draw_seed()` once, before any
rank sees the request, so every rank draws the same noise and the record says which seed made the video."""

import random

SEED_LIMIT = 2**31 - 1  # seeds are in [0, SEED_LIMIT): what torch.Generator.manual_seed and the API accept


def draw_seed() -> int:
    return random.randrange(SEED_LIMIT)
