"""How long the mp4 takes after the last decoded frame, by libx264 settings and by what the frames show (#20 item 4).

The serving path streams frames into `pab.video.Mp4Writer` on a thread while the VAE decodes the next ones, so
what a user waits for beyond the decode is the encoder's tail: the time from the last frame written to the
finished file. x264 holds back up to `rc-lookahead` frames (40 at its default `medium` preset), so for a short
clip most of the work can land in that tail. This feeds frames in chunks at a decode's pace and reports, per
content and setting, the tail, the file size and the PSNR against the frames.

    python -m bench.mp4                                  # 51 frames of 480x854 at 24 fps, as Open-Sora 480p
    python -m bench.mp4 --frames 16 --size 256x256 --out /tmp/mp4.json

Content: `noise` is what random weights render (the worst case for x264: every frame new, nothing to predict);
`pan` a camera pan over a 1/f texture; `moving` a disk crossing a gradient with some grain.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

# Each setting names its preset and lookahead; "ours" is what Mp4Writer runs by default (pab.video.DEFAULT_X264).
SETTINGS: dict[str, dict[str, str]] = {
    "medium (x264's default)": {"preset": "medium", "rc-lookahead": "40"},
    "ours": {},
    "medium, rc-lookahead 8": {"preset": "medium", "rc-lookahead": "8"},
    "fast": {"preset": "fast", "rc-lookahead": "30"},
    "veryfast": {"preset": "veryfast", "rc-lookahead": "10"},
    "faster, rc-lookahead 8": {"preset": "faster", "rc-lookahead": "8"},
    "veryfast, rc-lookahead 8": {"preset": "veryfast", "rc-lookahead": "8"},
    "faster, rc-lookahead 8, 8 threads": {"preset": "faster", "rc-lookahead": "8", "threads": "8"},
    # Every row runs DEFAULT_X264's frame threads unless it says otherwise. PyAV's own default is slice threads,
    # which x264 caps at a thread per 4 macroblock rows (7 at 480p); `sliced-threads` is no libx264 option, so
    # the rows once measured with it ran the default of their day.
    "ours, slice threads": {"thread_type": "slice"},
}


def content(kind: str, frames: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(frames, h, w, 3) uint8 frames of one kind (module docstring)."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    if kind == "pan":
        fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w + 3 * frames)[None, :]
        amp = 1 / np.maximum(np.hypot(fy, fx), 1 / 400)
        tex = np.stack([np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random(amp.shape))).real for _ in range(3)], -1)
        tex = (tex - tex.min()) / (tex.max() - tex.min()) * 255
        return np.stack([tex[:, 3 * t : 3 * t + w] for t in range(frames)]).astype(np.uint8)
    if kind == "moving":
        yy, xx = np.mgrid[0:h, 0:w]
        out = np.empty((frames, h, w, 3), np.uint8)
        radius = max(h // 7, 2)
        for t in range(frames):
            base = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 60)], -1).astype(float)
            cx, cy = w // 8 + (w * 3 // 4) * t // max(frames - 1, 1), h // 2 + int(h / 8 * np.sin(t / 8))
            base[(xx - cx) ** 2 + (yy - cy) ** 2 < radius**2] = (230, 30, 30)
            out[t] = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        return out
    raise ValueError(f"unknown content {kind!r}; known: noise, pan, moving")


def encode(frames: np.ndarray, fps: int, x264: dict[str, str], chunk: int, pace_s: float) -> dict[str, float]:
    """Stream `frames` into a background Mp4Writer, `chunk` at a time every `pace_s` (the decode); the tail, the
    whole time, the size and the PSNR of what decodes."""
    import av

    from pab.eval.metrics import psnr
    from pab.video import Mp4Writer

    buf = io.BytesIO()
    writer = Mp4Writer(buf, fps, background=True, x264=x264)
    t0 = time.perf_counter()
    for i in range(0, len(frames), chunk):
        time.sleep(pace_s)
        writer.write(frames[i : i + chunk])
    last = time.perf_counter()
    writer.close()
    end = time.perf_counter()
    with av.open(io.BytesIO(buf.getvalue())) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    h, w = frames.shape[1:3]
    return {"tail_s": end - last, "total_s": end - t0, "mb": len(buf.getvalue()) / 1e6,
            "psnr_db": psnr(decoded[:, :h, :w], frames)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=51)
    p.add_argument("--size", default="480x854", help="HxW")
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--chunk", type=int, default=4, help="frames per decoded chunk (the VAE's micro-batch)")
    p.add_argument("--decode-s", type=float, default=1.5, help="the whole decode's time, spread over the chunks")
    p.add_argument("--content", default="noise,pan,moving")
    p.add_argument("--settings", default=";".join(SETTINGS), help="semicolon list of SETTINGS' names")
    p.add_argument("--out", default=None, help="JSON record (default bench/results/mp4-<host>.json)")
    a = p.parse_args(argv)
    from pab.video import x264_settings

    h, w = (int(v) for v in a.size.split("x"))
    chunks = -(-a.frames // a.chunk)
    pace = a.decode_s / chunks
    rows: list[dict[str, Any]] = []
    print(f"{a.frames} frames {h}x{w}, {chunks} chunks of {a.chunk} every {pace * 1000:.0f} ms; "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")  # fmt: skip
    print(f"{'content':8s} {'x264':40s} {'tail s':>7s} {'total s':>8s} {'MB':>6s} {'PSNR dB':>8s}")
    for kind in a.content.split(","):
        frames = content(kind, a.frames, h, w)
        for name in a.settings.split(";"):
            if name not in SETTINGS:
                raise SystemExit(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
            x264 = SETTINGS[name]
            r = {"content": kind, "x264": name, "options": x264_settings(x264),
                 **encode(frames, a.fps, x264, a.chunk, pace)}  # fmt: skip
            rows.append(r)
            print(f"{kind:8s} {name:40s} {r['tail_s']:7.2f} {r['total_s']:8.2f} {r['mb']:6.2f} {r['psnr_db']:8.2f}",
                  flush=True)  # fmt: skip
    out = Path(a.out or f"bench/results/mp4-{platform.node() or 'host'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"bench": "mp4", "frames": a.frames, "height": h, "width": w, "fps": a.fps, "chunk": a.chunk,
              "decode_s": a.decode_s, "cpus": os.cpu_count(), "rows": rows}  # fmt: skip
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
