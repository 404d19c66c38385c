"""On a GPU: the pipeline's decode pins a piece or two of host memory, however long the video.

Each piece of frames is copied to the host through pinned staging (so the GPU never waits on the copy) and then
into the video's one array. Before, every piece kept its own pinned buffer to the end: a 204-frame 720p video held
at least 0.56 GB of page-locked host memory, which torch's pinned pool then kept for the life of the process.
"""

import numpy as np
import pytest
import torch

from pab.pipeline import GenerationRequest, Pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_decode_pins_two_pieces_at_most():
    stats = getattr(torch.cuda.memory, "host_memory_stats", None)
    reset = getattr(torch.cuda.memory, "reset_peak_host_memory_stats", None)
    empty = getattr(torch._C, "_host_emptyCache", None)
    if stats is None or reset is None or empty is None:
        pytest.skip("this torch does not report its pinned pool's size")
    pipe = Pipeline.from_name("opensora-v1.2-tiny", device="cuda", dtype=torch.bfloat16)
    request = GenerationRequest(model="opensora-v1.2-tiny", prompt="a red fox", seed=0, steps=2, num_frames=51)
    pieces: list[np.ndarray] = []
    pipe.generate(request)  # warm-up: kernels compiled, the model's first-call work done
    torch.cuda.synchronize()
    empty()  # the pool gives back every block no tensor holds, so the decode has to pin what it uses anew
    # "allocated_bytes" is what the pool has pinned (cudaHostAlloc'd), free blocks included: what the process keeps.
    # (torch 2.11's "active_bytes" never counts a free, so it only grows; and it reports nothing before the pool's
    # first use, hence the stats are read only now.)
    before = stats().get("allocated_bytes.current", 0)
    reset()
    res = pipe.generate(request, frame_sink=pieces.append)
    assert len(pieces) >= 8 and res.frames.nbytes > 4 * max(p.nbytes for p in pieces)  # enough pieces to matter
    # Two pieces are in flight at most, so the pool needs two blocks of each size at most: the allocator rounds a
    # block up to a power of two, and a piece with fewer frames than the rest may get a smaller one. Before, it pinned
    # a block for every piece: on an H100 with torch 2.11, 13 pieces grew the pool by 1,638,400 bytes, now 327,680.
    blocks = [2 ** int(np.ceil(np.log2(p.nbytes))) for p in pieces]
    bound = sum(size * min(2, blocks.count(size)) for size in set(blocks))
    grown = stats()["allocated_bytes.peak"] - before
    assert grown <= bound, (grown, bound, [p.nbytes for p in pieces], stats())
    assert np.array_equal(np.concatenate(pieces), res.frames)
