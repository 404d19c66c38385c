"""MP4 (H.264) writing and reading with PyAV, and the [-1, 1] -> uint8 frame conversion.

* `write_mp4(dest, frames, fps)`, or `Mp4Writer` for frames that arrive in chunks (optionally encoded on a
  background thread while the caller decodes the next ones): libx264, yuv420p. yuv420p needs even
  sizes, so an odd height or width is PADDED by one row/column that repeats the last one (edge
  padding): no generated pixel is lost, and the file is (H + H % 2) x (W + W % 2). Paths are written
  atomically: the video goes to a hidden temporary file in the destination folder, is fsynced, and is
  renamed over `dest` only when complete, so a failure (or a crash) never leaves a partial or truncated
  mp4 under `dest`. File objects get the finished bytes in one `write` after encoding succeeded (works
  for non-seekable streams too; the mp4 muxer itself needs to seek).
* `read_video(src)`: all frames as uint8 RGB (F, H, W, 3) plus the stream's frame rate.
* `to_uint8_frames(video)`: the decoder's (B=1, 3, F, H, W) in [-1, 1] to (F, H, W, 3) uint8 with the
  rounding the official pipelines use (clamp, (x + 1) / 2 * 255 + 0.5, truncate); computed in float32
  (VideoSys does it in the pipeline dtype, which in bf16 can move a value by one level).
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

DEFAULT_CRF = 23  # libx264's own default quality
# What a user waits for beyond the VAE is x264's tail: the frames it still holds when the last one arrives.
# `medium` looks 40 frames ahead for rate control, so it held back most of a short clip; 8 frames cut the tail
# from 0.64 to 0.17 s at Open-Sora 480p for a moving subject (H200 host, 16 cores). `faster` then searches less a
# frame (fewer references, a coarser subpixel search): on the H100 host (16 cores) it took the tail from 0.08 to
# 0.04 s for a moving subject at the same PSNR and a 28% smaller file, from 0.70 to 0.18 s on noise, and cost a
# textured pan 0.27 dB (bench/mp4.py, bench/results/mp4-h100-host.json, docs/performance.md). PyAV opens the encoder
# with slice threads, which x264 caps at a thread per 4 macroblock rows (7 at 480p): frame threads use every core
# and took the tail on noise from 0.35 to 0.19 s on an H100 host (16 cores), with smaller files for a moving subject
# (no slice borders). `thread_type` is FFmpeg's codec option, not x264's, but rides in the same dict. A caller's
# `x264` options override these.
DEFAULT_X264 = {"preset": "faster", "rc-lookahead": "8", "thread_type": "frame"}


# libx264's macroblock-tree rate control made different files of the same frames from run to run when a side is
# under 128 pixels (the small models' 64x64 and 96x64: 4-8 distinct mp4s in 40 encodes of one clip, decoded pixels
# up to 50/255 apart; 128x128: one), so a re-rendered bulk row did not reproduce its video. Without it (mbtree
# off), 40 of 40 were identical. Larger sizes keep it (off, a grainy 480p clip's file grew 8x): there x264 still
# writes another file now and then (at 256x320, 1-3 of 40 encodes differed from the rest; 6-7 of 20 before
# `_yuv420` took the RGB conversion out of PyAV's encode). A caller's `x264` options still win.
SMALL_SIDE = 128


def x264_settings(x264: dict[str, str] | None = None, size: tuple[int, int] | None = None) -> dict[str, str]:
    """The libx264 options an `Mp4Writer` given `x264` encodes with: `DEFAULT_X264`, mbtree off for frames of
    `size` (h, w) with a side under `SMALL_SIDE`, then these."""
    small = {"mbtree": "0"} if size is not None and min(size) < SMALL_SIDE else {}
    return {**DEFAULT_X264, **small, **(x264 or {})}


def _as_frames(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}; convert [-1, 1] videos with to_uint8_frames")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"empty video: frames shape {frames.shape}")
    return np.ascontiguousarray(frames)


def _even(frames: np.ndarray) -> np.ndarray:
    """Edge-pad H and W up to even sizes (yuv420p subsamples chroma 2x2)."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _rate(fps: int | float | Fraction) -> Fraction:
    rate = Fraction(fps).limit_denominator(1001 * 1000) if not isinstance(fps, Fraction) else fps
    if rate <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return rate


class Mp4Writer:
    """An H.264 mp4 (libx264, yuv420p) written as frames arrive: `write(chunk)` any number of times, then `close()`.

    With `background=True` a thread encodes while the caller goes on, e.g. decoding the next frames on the
    GPU: `write` only queues the chunk, and `close()` waits for the encoder and raises what it raised. A path
    is written atomically (a hidden temporary file, fsynced, renamed over `dest` by `close()`); a failure or
    `abort()` leaves nothing behind. A file object gets the finished bytes in one `write` at `close()`.
    """

    def __init__(
        self, dest: str | os.PathLike | BinaryIO, fps: int | float | Fraction, *, crf: int = DEFAULT_CRF,
        background: bool = False, x264: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.rate, self.crf, self.dest = _rate(fps), crf, dest
        self._x264 = x264  # the caller's libx264 options; `x264_settings` adds ours once the frame size is known
        self.frames_written = 0
        self._container = self._stream = self._fh = self._tmp = None
        self._buf = io.BytesIO() if not isinstance(dest, (str, os.PathLike)) else None
        self._error: BaseException | None = None
        self._queue = self._thread = self._reformatter = None
        if background:
            import queue
            import threading

            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._drain, name="mp4-encoder", daemon=True)
            self._thread.start()

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Append uint8 RGB frames (F, H, W, 3); every chunk has the first chunk's size."""
        frames = self._yuv420(_as_frames(frames))
        if self._queue is None:
            self._encode(frames)
        elif self._error is None:  # after a failure the rest is dropped; close() raises it
            self._queue.put(frames)

    def close(self) -> None:
        """Finish the file; raises (and leaves no file) if encoding failed or nothing was written."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        try:
            if self._error is not None:
                raise self._error
            if self._container is None:
                raise ValueError("empty video: no frames were written")
            self._container.mux(self._stream.encode())  # flush the encoder's delayed frames
            self._container.close()
            self._container = None
            if self._buf is not None:
                self.dest.write(self._buf.getvalue())
            else:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
                os.replace(self._tmp, self.dest)
                self._tmp = None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop and remove the temporary file; `dest` keeps what it had."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        for closing in (self._container, self._fh):
            with contextlib.suppress(Exception):
                closing is not None and closing.close()
        self._container = self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _drain(self) -> None:
        while (frames := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._encode(frames)
                except BaseException as e:  # noqa: BLE001 - handed to close()
                    self._error = e

    def _open(self, h: int, w: int) -> None:
        import av  # imported here: frames can be produced (and benchmarked) where PyAV is not installed

        out = self._buf
        if out is None:
            dest = Path(self.dest)
            self._tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
            # O_EXCL: never clobber someone else's temp file; mode 0o666 so the umask decides, as for `open`.
            self._fh = out = os.fdopen(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
        self._container = av.open(out, mode="w", format="mp4")
        self._stream = self._container.add_stream("libx264", rate=self.rate)
        self._stream.width, self._stream.height = w, h
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = 1 / self.rate  # pts counts frames
        self._stream.options = {"crf": str(self.crf), **x264_settings(self._x264, (h, w))}

    def _yuv420(self, frames: np.ndarray) -> list:
        """The frames as the yuv420p VideoFrames x264 takes: the conversion PyAV's `encode` would make (swscale,
        the same defaults), made here so that a background encoder's thread spends its time on x264 alone. The
        caller runs it while the GPU decodes the next frames: ~2 ms a 480p frame on one core (#20 item 4; the
        tail on noise fell 0.16 s on 2 cores, 0.02 s on 16, where swscale has threads of its own)."""
        import av
        from av.video.reformatter import VideoReformatter

        if self._reformatter is None:
            self._reformatter = VideoReformatter()  # keeps its scaler context from chunk to chunk
        return [self._reformatter.reformat(av.VideoFrame.from_ndarray(arr, format="rgb24"), format="yuv420p")
                for arr in _even(frames)]  # fmt: skip

    def _encode(self, frames: list) -> None:
        h, w = frames[0].height, frames[0].width
        if self._container is None:
            self._open(h, w)
        elif (h, w) != (self._stream.height, self._stream.width):
            raise ValueError(f"frames of {w}x{h} in a video of {self._stream.width}x{self._stream.height}")
        for frame in frames:
            frame.pts = self.frames_written
            self._container.mux(self._stream.encode(frame))
            self.frames_written += 1


def write_mp4(
    dest: str | os.PathLike | BinaryIO,
    frames: np.ndarray | torch.Tensor,
    fps: int | float,
    *,
    crf: int = DEFAULT_CRF,
) -> None:
    """Write uint8 RGB `frames` (F, H, W, 3) as an H.264 mp4 to a path (atomically) or a binary file object."""
    frames = _as_frames(frames)
    with Mp4Writer(dest, fps, crf=crf) as writer:
        writer.write(frames)


@contextlib.contextmanager
def _open_video(src: str | os.PathLike | BinaryIO | bytes):
    """(container, first video stream) of a file, a path, a binary stream or bytes; ValueError without video."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    elif isinstance(src, os.PathLike):
        src = os.fspath(src)
    import av

    with av.open(src, mode="r") as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        yield container, container.streams.video[0]

def read_video(src: str | os.PathLike | BinaryIO | bytes) -> tuple[np.ndarray, float]:
    """Decode every frame of the first video stream: (frames uint8 (F, H, W, 3), fps)."""
    with _open_video(src) as (container, stream):
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError("video stream has no frames")
    return np.stack(frames), float(rate) if rate else 0.0


def to_uint8_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """(1, 3, F, H, W) or (3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8 on the CPU."""
    return _uint8_on_device(video).cpu().numpy()


def to_uint8_frames_async(video: torch.Tensor, out: np.ndarray | None = None) -> Callable[[], np.ndarray]:
    """`to_uint8_frames`, queued on the video's device without waiting: the conversion and the copy into pinned
    host memory run in stream order, and the returned callable waits for them and gives the frames. A decode
    loop can so queue the next frames' decode before it takes these (the GPU is never idle on the copy). On the
    CPU the frames are ready at once.

    With `out` (an (F, H, W, 3) uint8 array) the frames land there and the callable returns it: the pinned
    buffer is then only staging, back in torch's pinned pool once the callable is dropped, so a long video
    pins a piece or two's worth of host memory, not all of it, and its pieces need no concatenation."""
    x = _uint8_on_device(video)
    if out is not None and (out.shape != tuple(x.shape) or out.dtype != np.uint8):
        raise ValueError(f"out must be a uint8 array of shape {tuple(x.shape)}, got {out.dtype} {out.shape}")
    if not x.is_cuda:
        frames = x.numpy()
        if out is not None:
            out[...] = frames
            frames = out
        return lambda: frames
    host = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(x, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> np.ndarray:
        done.synchronize()
        if out is None:
            return host.numpy()
        out[...] = host.numpy()
        return out

    return wait


def _uint8_on_device(video: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(1, 3, F, H, W) or (3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8 on the video's device."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(video)
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"batch of {video.shape[0]} videos: convert them one at a time (video[b])")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be (3, F, H, W) or (1, 3, F, H, W), got shape {tuple(video.shape)}")
    # On the video's own device, then one uint8 copy to the CPU: a 480p clip is ~60 M values, and these eight
    # float32 passes take ~0.5 s on one CPU thread (a Ray actor's default) against ~1 ms on a GPU. Same ops in
    # the same order in float32, so the bytes are identical on either device.
    x = video.detach().to(torch.float32).clamp(-1, 1)
    x = ((x + 1) / 2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous()


def frame_indices(num_frames: int, n: int) -> list[int]:
    """`n` (at most `num_frames`) evenly spaced frame indices, each the middle of its equal share of the video."""
    n = max(1, min(n, num_frames))
    return [min(num_frames - 1, (2 * i + 1) * num_frames // (2 * n)) for i in range(n)]


def _jpeg(arr: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def thumbnail_jpeg(frames: np.ndarray | torch.Tensor, *, quality: int = 90) -> bytes:
    """The middle frame of uint8 RGB (F, H, W, 3) as a JPEG of the frames' size."""
    frames = _as_frames(frames)
    return _jpeg(frames[frames.shape[0] // 2], quality)


SPRITE_FRAMES = 8  # tiles of a spritesheet, at most: one row
SPRITE_TILE_WIDTH = 256  # tiles wider than this are scaled down (aspect kept), so a sheet is at most 2048 wide


def spritesheet_jpeg(frames: np.ndarray | torch.Tensor, *, n: int = SPRITE_FRAMES,
                     tile_width: int = SPRITE_TILE_WIDTH, quality: int = 85) -> bytes:
    """Up to `n` evenly spaced frames of (F, H, W, 3) uint8 side by side in one row, as a JPEG.

    Each tile keeps the frame's aspect; frames wider than `tile_width` are scaled down to it.
    """
    from PIL import Image

    frames = _as_frames(frames)
    f, h, w, _ = frames.shape
    tw = min(w, tile_width)
    th = max(1, round(h * tw / w))
    tiles = [frames[i] for i in frame_indices(f, n)]
    if (tw, th) != (w, h):
        tiles = [np.asarray(Image.fromarray(t).resize((tw, th), Image.BILINEAR)) for t in tiles]
    return _jpeg(np.concatenate(tiles, axis=1), quality)


def sample_frames(src: str | os.PathLike | BinaryIO | bytes, n: int) -> np.ndarray:
    """`n` evenly spaced frames of a video (as `frame_indices` picks them), keeping only those in memory."""
    with _open_video(src) as (container, stream):
        total = int(stream.frames or 0)
        if total <= 0:  # the container does not say: count by decoding (cheap next to a render)
            total = sum(1 for _ in container.decode(stream))
            container.seek(0)
        want = set(frame_indices(total, n)) if total > 0 else set()
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(stream)) if i in want]
    if not frames:
        raise ValueError("video stream has no frames")
    return np.stack(frames)


def still_images(src: str | os.PathLike | BinaryIO | bytes, variants: tuple[str, ...]) -> dict[str, bytes]:
    """The JPEG stills ("thumbnail", "spritesheet") of a stored video, made from its frames: for a video whose
    own were never written (a run stopped between the mp4 and them). The same frames as the renderer's: the
    middle one; up to `SPRITE_FRAMES` evenly spaced ones."""
    out = {}
    for v in variants:
        if hasattr(src, "seek"):  # a stream is read once per image
            src.seek(0)
        if v == "thumbnail":
            out[v] = thumbnail_jpeg(sample_frames(src, 1))
        elif v == "spritesheet":
            out[v] = spritesheet_jpeg(sample_frames(src, SPRITE_FRAMES))
        else:
            raise ValueError(f"unknown still image {v!r}; known: thumbnail, spritesheet")
    return out


__all__ = ["write_mp4", "read_video", "to_uint8_frames", "DEFAULT_CRF", "thumbnail_jpeg", "spritesheet_jpeg",
           "sample_frames", "frame_indices", "still_images"]


def write_strip(path: str | Path, frames: np.ndarray, every: int = 4, scale: int = 2) -> None:
    """Every `every`-th frame of (F, H, W, 3) uint8 side by side, enlarged `scale` times, as a PNG."""
    from PIL import Image

    strip = np.concatenate(list(frames[::every]), axis=1)  # (H, W * n, 3)
    img = Image.fromarray(strip)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path, format="PNG")

