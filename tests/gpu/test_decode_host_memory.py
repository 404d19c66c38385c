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
    if stats is None or reset is None or "active_bytes.peak" not in stats():
        pytest.skip("this torch does not report its pinned allocator's peak")
    pipe = Pipeline.from_name("opensora-v1.2-tiny", device="cuda", dtype=torch.bfloat16)
    request = GenerationRequest(model="opensora-v1.2-tiny", prompt="a red fox", seed=0, steps=2, num_frames=51)
    pieces: list[np.ndarray] = []
    pipe.generate(request)  # warm-up: the pool's blocks exist before the peak is measured
    reset()
    res = pipe.generate(request, frame_sink=pieces.append)
    piece = max(p.nbytes for p in pieces)
    assert len(pieces) >= 8 and res.frames.nbytes > 4 * piece  # enough pieces for the bound to mean something
    # two pieces in flight, each block rounded up to a power of two by the allocator
    assert stats()["active_bytes.peak"] <= 2 * 2 ** int(np.ceil(np.log2(piece))), (stats(), piece)
    assert np.array_equal(np.concatenate(pieces), res.frames)
