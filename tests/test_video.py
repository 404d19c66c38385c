"""mp4 writing/reading with PyAV: round trips, odd sizes, atomic writes, file objects, uint8 conversion."""

import io
import os

import av
import numpy as np
import pytest
import torch

from pab.video import Mp4Writer, read_video, to_uint8_frames, to_uint8_frames_async, write_mp4


def _frames(f=6, h=32, w=48, seed=0):
    """Smooth moving gradients: survive H.264 with small error, and every frame differs."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((f, h, w, 3), np.uint8)
    for i in range(f):
        out[i, ..., 0] = (xx * 255 // max(w - 1, 1) + 20 * i) % 256
        out[i, ..., 1] = yy * 255 // max(h - 1, 1)
        out[i, ..., 2] = 40 * i + seed
    return out


def test_round_trip_count_size_fps(tmp_path):
    frames = _frames()
    path = tmp_path / "v.mp4"
    write_mp4(path, frames, 24)
    back, fps = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert fps == 24.0
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6
    with av.open(str(path)) as c:  # H.264 in yuv420p, as promised
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temp files left behind


def test_fractional_fps_and_tensor_input(tmp_path):
    write_mp4(str(tmp_path / "a.mp4"), torch.from_numpy(_frames(f=3)), 23.976)
    back, fps = read_video(str(tmp_path / "a.mp4"))
    assert len(back) == 3
    assert fps == pytest.approx(23.976, abs=1e-3)


@pytest.mark.parametrize("h,w", [(33, 17), (1, 1), (16, 9)])
def test_odd_sizes_are_edge_padded_to_even(tmp_path, h, w):
    frames = _frames(f=2, h=h, w=w)
    write_mp4(tmp_path / "odd.mp4", frames, 8)
    back, _ = read_video(tmp_path / "odd.mp4")
    assert back.shape == (2, h + h % 2, w + w % 2, 3)
    if h > 8 and w > 8:
        assert np.abs(back[:, :h, :w].astype(int) - frames.astype(int)).mean() < 8


def _fail_frame(monkeypatch, n: int, message: str) -> dict:
    """Make the encoder fail on its n-th frame (counted in the returned dict, which may be reset)."""
    real = av.video.stream.VideoStream.encode
    calls = {"n": 0}

    def flaky(stream, frame=None):
        if frame is not None:
            calls["n"] += 1
            if calls["n"] == n:
                raise RuntimeError(message)
        return real(stream, frame)

    monkeypatch.setattr(av.video.stream.VideoStream, "encode", flaky)
    return calls


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "out.mp4"
    write_mp4(path, _frames(f=2), 8)
    old = path.read_bytes()

    calls = _fail_frame(monkeypatch, 4, "disk on fire")
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_mp4(path, _frames(f=6), 8)
    assert path.read_bytes() == old  # the previous complete video is untouched
    with pytest.raises(RuntimeError):
        calls["n"] = 0
        write_mp4(tmp_path / "new.mp4", _frames(f=6), 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no partial, no temp


def test_write_to_file_objects():
    buf = io.BytesIO()
    write_mp4(buf, _frames(f=4), 12)
    data = buf.getvalue()
    assert data[4:8] == b"ftyp"
    back, fps = read_video(data)
    assert back.shape == (4, 32, 48, 3) and fps == 12.0

    class NoSeek(io.RawIOBase):  # a pipe / socket / HTTP body: write-only, no seek
        def __init__(self):
            self.chunks = []

        def writable(self):
            return True

        def write(self, b):
            self.chunks.append(bytes(b))
            return len(b)

    sink = NoSeek()
    write_mp4(sink, _frames(f=4), 12)
    assert b"".join(sink.chunks) == data  # same encoder settings, same bytes
    back, _ = read_video(io.BytesIO(data))
    assert len(back) == 4


def test_bad_inputs():
    with pytest.raises(TypeError, match="uint8"):
        write_mp4(io.BytesIO(), np.zeros((2, 4, 4, 3), np.float32), 8)
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        write_mp4(io.BytesIO(), np.zeros((4, 4, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="fps"):
        write_mp4(io.BytesIO(), np.zeros((1, 4, 4, 3), np.uint8), 0)


def test_to_uint8_frames():
    v = torch.zeros(1, 3, 2, 4, 5)
    v[0, 0] = -1.0
    v[0, 1] = 1.0
    v[0, 2, 1] = 3.0  # out of range: clamped
    out = to_uint8_frames(v)
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
    assert (out[..., 0] == 0).all() and (out[..., 1] == 255).all()
    assert (out[0, ..., 2] == 128).all() and (out[1, ..., 2] == 255).all()  # 0 -> 127.5 + 0.5 -> 128
    assert np.array_equal(to_uint8_frames(v[0].to(torch.bfloat16)), out)  # unbatched, any dtype
    with pytest.raises(ValueError, match="one at a time"):
        to_uint8_frames(torch.zeros(2, 3, 1, 2, 2))
    assert np.array_equal(to_uint8_frames_async(v)(), out)  # on the CPU: ready at once
    into = np.zeros((3, 4, 5, 3), np.uint8)
    assert np.shares_memory(to_uint8_frames_async(v, out=into[1:])(), into)
    assert np.array_equal(into[1:], out) and not into[0].any()  # the frames land in the slice given, only there
    with pytest.raises(ValueError, match=r"shape \(2, 4, 5, 3\)"):
        to_uint8_frames_async(v, out=into)


def test_uint8_round_trip_through_mp4(tmp_path):
    v = torch.linspace(-1, 1, 8 * 16).reshape(1, 1, 1, 8, 16).expand(1, 3, 3, 8, 16)
    frames = to_uint8_frames(v)
    write_mp4(os.fspath(tmp_path / "g.mp4"), frames, 8)
    back, _ = read_video(tmp_path / "g.mp4")
    assert back.shape == frames.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="converts on the GPU")
def test_to_uint8_frames_on_the_gpu_gives_the_same_bytes():
    """The conversion runs on the video's device (a CPU thread is slow at 480p); the bytes do not depend on it."""
    torch.manual_seed(0)
    v = torch.randn(1, 3, 9, 48, 64) * 0.7
    v[0, 0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.0, 2.0])  # the clamp ends and an exact midpoint
    assert np.array_equal(to_uint8_frames(v.cuda()), to_uint8_frames(v))
    assert np.array_equal(to_uint8_frames(v.cuda().to(torch.bfloat16)), to_uint8_frames(v.to(torch.bfloat16)))
    # Queued without waiting (pinned memory, an event): the same bytes once taken, even with more work queued.
    ready = to_uint8_frames_async(v.cuda())
    torch.cuda._sleep(10_000_000)  # the GPU busy for a while after the copy was queued
    assert np.array_equal(ready(), to_uint8_frames(v))
    # Into an array given (the pipeline's whole video): the bytes are there once taken, and only in the slice.
    into = np.zeros((10, 48, 64, 3), np.uint8)
    ready = to_uint8_frames_async(v.cuda(), out=into[1:])
    torch.cuda._sleep(10_000_000)
    assert np.array_equal(ready(), to_uint8_frames(v)) and np.array_equal(into[1:], to_uint8_frames(v))
    assert not into[0].any()


def test_thumbnail_spritesheet_and_sampled_frames(tmp_path):
    """The still images of `GET .../content?variant=` (#16 item 1): middle frame; up to 8 frames in one row."""
    from PIL import Image

    from pab.video import frame_indices, sample_frames, spritesheet_jpeg, thumbnail_jpeg

    assert frame_indices(32, 8) == [2, 6, 10, 14, 18, 22, 26, 30] and frame_indices(3, 8) == [0, 1, 2]
    assert frame_indices(17, 1) == [8]
    frames = np.stack([np.full((36, 64, 3), 7 * i, np.uint8) for i in range(20)])  # frame i is grey 7*i
    thumb = Image.open(io.BytesIO(thumbnail_jpeg(frames)))
    assert thumb.size == (64, 36) and abs(int(np.asarray(thumb)[18, 32, 0]) - 70) <= 2  # frame 10
    sheet = Image.open(io.BytesIO(spritesheet_jpeg(frames)))
    assert sheet.size == (8 * 64, 36)
    wide = Image.open(io.BytesIO(spritesheet_jpeg(np.zeros((2, 100, 1000, 3), np.uint8))))
    assert wide.size == (2 * 256, 26)  # tiles scaled to 256 wide, aspect kept

    path = tmp_path / "v.mp4"
    write_mp4(path, frames, 8)
    picked = sample_frames(path, 8)
    assert picked.shape == (8, 36, 64, 3)
    assert [round(float(f.mean()) / 7) for f in picked] == frame_indices(20, 8)


@pytest.mark.parametrize("background", [False, True])
def test_frames_written_in_chunks_make_the_same_file(tmp_path, background):
    frames = _frames(f=7, h=33, w=47)
    write_mp4(tmp_path / "whole.mp4", frames, 8)
    with Mp4Writer(tmp_path / "chunks.mp4", 8, background=background) as writer:
        for chunk in (frames[:3], frames[3:4], frames[4:]):  # as a VAE decodes them
            writer.write(chunk)
    # Compare what decodes (at 128 pixels and up, macroblock-tree rate control is on and the bytes may vary).
    whole, fps = read_video(tmp_path / "whole.mp4")
    chunks, fps_chunks = read_video(tmp_path / "chunks.mp4")
    assert chunks.shape == whole.shape == (7, 34, 48, 3) and fps_chunks == fps == 8.0
    err = [np.abs(v[:, :33, :47].astype(int) - frames).mean() for v in (whole, chunks)]
    assert err[1] < 1.25 * err[0] + 0.5  # as close to the source as one write
    assert writer.frames_written == 7


def test_a_small_video_is_the_same_file_every_time():
    """The small models' 64x64 clips: one file for the same frames, however they are written (libx264's
    macroblock tree, on for larger frames, gave 4-8 distinct files in 40 encodes at this size)."""
    frames = np.concatenate([_frames(f=6, h=64, w=64, seed=s) for s in (0, 3, 7)])[:17]
    files = set()
    for i in range(8):
        buf = io.BytesIO()
        with Mp4Writer(buf, 8, background=i % 2 == 1) as writer:
            for chunk in (frames[:8], frames[8:]):
                writer.write(chunk)
        files.add(buf.getvalue())
    assert len(files) == 1
    assert b"mbtree=0" in files.pop()
    buf = io.BytesIO()
    with Mp4Writer(buf, 8) as writer:  # 128 pixels a side and up keep it
        writer.write(_frames(f=5, h=128, w=128))
    assert b"mbtree=1" in buf.getvalue()


def test_x264_options_reach_the_encoder(tmp_path):
    import av

    frames = _frames(f=5, h=32, w=48)
    profiles = {}
    for preset in (None, "ultrafast"):  # ultrafast turns CABAC and B-frames off: a Baseline-profile stream
        path = tmp_path / f"{preset}.mp4"
        with Mp4Writer(path, 8, x264={"preset": preset} if preset else None) as writer:
            writer.write(frames)
        with av.open(str(path)) as c:
            profiles[preset] = c.streams.video[0].codec_context.profile
    assert profiles == {None: "High", "ultrafast": "Constrained Baseline"}
    with pytest.raises(av.error.ArgumentError, match="nope"), Mp4Writer(tmp_path / "bad.mp4", 8, x264={"preset": "nope"}) as w:
        w.write(frames)
    assert not list(tmp_path.glob("*bad*"))  # nothing left behind


@pytest.mark.parametrize("x264, ran", [
    # faster's subpixel search and references; frame threads (sliced_threads=0: PyAV's own default is slices)
    (None, [b"rc_lookahead=8 ", b"subme=4 ", b"ref=2 ", b"sliced_threads=0 "]),
    ({"rc-lookahead": "40", "preset": "medium", "thread_type": "slice", "threads": "2"},
     [b"rc_lookahead=40 ", b"subme=7 ", b"ref=3 ", b"sliced_threads=1 "]),
])  # fmt: skip
def test_the_encoder_runs_faster_with_8_frames_of_lookahead_unless_told(tmp_path, x264, ran):
    """x264 writes the settings it ran with into the stream (an SEI text): the default preset, lookahead and
    threading, or the caller's (at 128 pixels a side: x264 names its lookahead where the macroblock tree uses it)."""
    path = tmp_path / "v.mp4"
    with Mp4Writer(path, 8, x264=x264) as writer:
        writer.write(_frames(f=5, h=128, w=128))
    data = path.read_bytes()
    assert all(setting in data for setting in ran), data[data.find(b"x264 - core"):][:600]


def test_a_background_failure_is_raised_by_close_and_leaves_no_file(tmp_path, monkeypatch):
    _fail_frame(monkeypatch, 3, "encoder died")
    writer = Mp4Writer(tmp_path / "v.mp4", 8, background=True)
    for _ in range(4):
        writer.write(_frames(f=2))  # returns at once; the encoder fails on the thread
    with pytest.raises(RuntimeError, match="encoder died"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_a_writer_refuses_another_size_and_an_empty_video(tmp_path):
    writer = Mp4Writer(tmp_path / "v.mp4", 8)
    writer.write(_frames(f=2))
    with pytest.raises(ValueError, match="frames of 16x32 in a video of 48x32"):
        writer.write(_frames(f=2, w=16))
    writer.abort()
    with pytest.raises(ValueError, match="no frames"):
        Mp4Writer(io.BytesIO(), 8).close()
    assert list(tmp_path.iterdir()) == []
