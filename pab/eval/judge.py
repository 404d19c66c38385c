"""A judge in code: does a clip show what its synthetic-shapes prompt asks for, object by object?

    verdict = judge(frames, "a red circle moving left slowly on a black background")  # frames (F, H, W, 3) uint8
    verdict.match, verdict.objects[0].shape, verdict.to_dict()

How it decides (sizes and speeds are measured at 64 px of frame height, the scale `pab.data.shapes` draws at,
so clips of other sizes, or resized ones, are judged alike):

1. Background: the median colour of a border ring, per frame, then over frames. It must be nearest, among
   the background palette, to the named background, and close to it.
2. Pixels: each pixel takes the nearest of the eight object colours and its frame's background colour, in
   RGB (the space the model generates in, where its noise is additive), or none when all are far; so
   anti-aliased edges and blends of two colours are mostly left out rather than counted as another colour.
3. Blobs: per frame, the pixels of the named colour lose what a 3x3 opening removes (speckles, and the thin
   rings that blurred edges of another colour can blend into: magenta over dark blue looks purple), are split
   into 8-connected blobs, and the blob with the most interior pixels is kept. Colour matches when that blob
   has a plausible area in at least half of the frames.
4. Shape: each of circle, square and apex-up triangle, with the signed-distance outline `pab.data.shapes`
   draws, is fitted per frame to the blob's outline (centre and size, Gauss-Newton with robust weights); the
   shape whose fits overlap the blob best (intersection over union, median over frames) is the one seen.
   Fitting an outline, not measuring the blob, is what copes with occlusion (below).
5. Motion: robust lines (Theil-Sen: the median of pairwise slopes) through the fitted centres give the speed
   in px/frame: at least 0.5 is a move, its main axis and sign the direction, over 1.5 "quickly" (slowly is
   1, quickly 2). Otherwise a robust line through log(size) says "growing" when the size grew over the clip
   by at least 1.34x (1.8x when growing), else "still".

Two objects can cross, and the one drawn first is then partly hidden under the other. Where the two meet,
the outline belongs to the one on top, so there each object's fit only asks the shape to cover the visible
pixels (the object may go on underneath) and the overlap does not count the other object's pixels: the
fitted shape completes the hidden part, and its centre and size stay true while it is partly covered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pab.data.shapes import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, ObjectSpec, parse_caption

COLOUR_CUTOFF = 100.0
"""RGB distance (0-255 per channel) beyond which a pixel has no colour; the closest palette pair is 86 apart."""
BACKGROUND_CUTOFF = 60.0
"""RGB distance from the named background within which the border median counts as that background."""
MIN_AREA, MAX_AREA = 20.0, 1600.0
"""Plausible blob areas in px at 64 px height: the smallest object (a triangle) covers ~67 px, the largest
(a grown square) ~1050 px; below is a speckle or a mostly hidden object, above is not one object."""
PRESENT_FRACTION = 0.5
"""Colour matches when a plausible blob of it is found in at least this fraction of the frames."""
MIN_OUTLINE = 8
"""Fewest visible outline points (at 64 px) for a frame to count in the shape and motion fits."""
FIT_STEPS = 6
"""Gauss-Newton steps of the shape fits; they settle in a handful."""
MOVING_SPEED, QUICK_SPEED = 0.5, 1.5
"""px/frame at 64 px height: slowly is 1, quickly 2, still 0."""
GROWING_SIZE_RATIO = 1.34
"""Last over first size of the robust line through log(size): 1 when still, 1.8 when growing."""


@dataclass(frozen=True)
class ObjectVerdict:
    """The judge's verdict on one object of the prompt, and what it saw."""

    object: ObjectSpec  # what the prompt asked for
    colour: bool  # the named colour is present as a blob of plausible size in most frames
    shape: bool  # the blob's outline is classified as the named shape
    motion: bool  # direction (left/right/up/down), still, or growing matches
    speed: bool | None  # for moving objects: slow vs quick matches; None otherwise
    found_shape: str | None  # what the judge saw (None when the colour was not found)
    found_motion: str | None

    @property
    def match(self) -> bool:
        return self.colour and self.shape and self.motion

    def to_dict(self) -> dict:
        o = self.object
        return {
            "object": {"shape": o.shape, "colour": o.colour, "motion": o.motion, "speed": o.speed},
            "phrase": o.phrase(),
            "match": self.match,
            "colour": self.colour,
            "shape": self.shape,
            "motion": self.motion,
            "speed": self.speed,
            "found_shape": self.found_shape,
            "found_motion": self.found_motion,
        }


@dataclass(frozen=True)
class Verdict:
    """The judge's verdict on a clip and its prompt: per object, and the background."""

    prompt: str
    objects: tuple[ObjectVerdict, ...]
    background: bool  # background colour matches

    @property
    def colour(self) -> bool:
        return all(o.colour for o in self.objects)

    @property
    def shape(self) -> bool:
        return all(o.shape for o in self.objects)

    @property
    def motion(self) -> bool:
        return all(o.motion for o in self.objects)

    @property
    def match(self) -> bool:
        return self.background and all(o.match for o in self.objects)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "match": self.match,
            "background": self.background,
            "colour": self.colour,
            "shape": self.shape,
            "motion": self.motion,
            "objects": [o.to_dict() for o in self.objects],
        }


def judge(frames: np.ndarray, prompt: str) -> Verdict:
    """Judge a clip (F, H, W, 3), uint8 (or floats in [0, 1]), against its prompt.

    Raises ValueError for a prompt outside the vocabulary of `pab.data.shapes` or frames of another layout.
    """
    scene = parse_caption(prompt)  # raises ValueError with the reason
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 2:
        raise ValueError(f"frames must be (F, H, W, 3) with F >= 2, got shape {frames.shape}")
    rgb = frames.astype(np.float32)
    if not np.issubdtype(frames.dtype, np.integer):
        rgb = rgb * 255.0 if rgb.max() <= 1.0 else rgb  # also accept floats in [0, 1]
    unit = frames.shape[1] / 64.0  # sizes and speeds are defined at 64 px of height

    bg = _border_colour(rgb)
    labels = _classify(rgb, bg)
    reach = max(2, round(2 * unit))
    # Only the part of the frames where the named colours are needs looking at; the same crop in every frame
    # keeps the motion as it was.
    named = np.isin(labels, [list(COLOURS).index(o.colour) for o in scene.objects]).any(axis=0)
    labels = labels[:, *_box(named, margin=reach + 2)]
    blobs = [_blob(labels == list(COLOURS).index(o.colour), unit) for o in scene.objects]
    # Where the objects meet, the lower one is hidden under the other (plus the blended pixels between the
    # two colours): there, neither one's outline is its own, so each fit leaves the other's pixels out.
    hidden = [_dilate(blobs[1 - i].mask, reach) if len(blobs) == 2 else np.zeros_like(b.mask)
              for i, b in enumerate(blobs)]  # fmt: skip
    verdicts = tuple(_object_verdict(o, b, h, unit) for o, b, h in zip(scene.objects, blobs, hidden))
    named_bg = np.array(BACKGROUNDS[scene.background], np.float32)
    bg_median = np.median(bg, axis=0)
    nearest_bg = min(BACKGROUNDS, key=lambda n: np.linalg.norm(bg_median - np.array(BACKGROUNDS[n])))
    background = nearest_bg == scene.background and np.linalg.norm(bg_median - named_bg) <= BACKGROUND_CUTOFF
    return Verdict(prompt, verdicts, bool(background))


# ----------------------------------------------------------------------------------------------------
# Pixels and blobs
# ----------------------------------------------------------------------------------------------------


def _border_colour(rgb: np.ndarray) -> np.ndarray:
    """Per-frame median colour of a border ring (F, 3): objects rarely reach the border, the background does."""
    F, H, W, _ = rgb.shape
    b = max(1, min(H, W) // 32)
    ring = np.concatenate(
        [rgb[:, :b].reshape(F, -1, 3), rgb[:, -b:].reshape(F, -1, 3),
         rgb[:, :, :b].reshape(F, -1, 3), rgb[:, :, -b:].reshape(F, -1, 3)], axis=1)  # fmt: skip
    return np.median(ring, axis=1)


def _box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """Rows and columns of the bounding box of a (H, W) mask, grown by `margin` (all of it when empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return slice(None), slice(None)
    H, W = mask.shape
    return (slice(max(rows[0] - margin, 0), min(rows[-1] + margin + 1, H)),
            slice(max(cols[0] - margin, 0), min(cols[-1] + margin + 1, W)))  # fmt: skip


def _classify(rgb: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Per pixel (F, H, W): index of the nearest object colour, len(COLOURS) for background, -1 for none."""
    palette = np.array(list(COLOURS.values()), np.float32)  # (8, 3)
    # Squared distances as |p|^2 - 2 c.p + |c|^2, colours first: one matrix product, and the reductions run
    # over the short leading axis (fast) rather than the last one.
    pixels = rgb.reshape(-1, 3).T  # (3, N)
    frame_bg = np.repeat(bg, rgb.shape[1] * rgb.shape[2], axis=0).T  # (3, N)
    norm = (pixels**2).sum(axis=0)
    dist = np.concatenate(
        [norm - 2 * palette @ pixels + (palette**2).sum(axis=1, keepdims=True),  # (8, N)
         ((pixels - frame_bg) ** 2).sum(axis=0, keepdims=True)], axis=0)  # fmt: skip
    labels = np.where(dist.min(axis=0) <= COLOUR_CUTOFF**2, dist.argmin(axis=0), -1)
    return labels.reshape(rgb.shape[:-1])


def _max3x3(a: np.ndarray) -> np.ndarray:
    """3x3 maximum over the last two axes, zero outside (separable: rows, then columns)."""
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)])
    r = np.maximum(np.maximum(p[..., :-2, :], p[..., 1:-1, :]), p[..., 2:, :])
    return np.maximum(np.maximum(r[..., :-2], r[..., 1:-1]), r[..., 2:])


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """`steps` 3x3 dilations: grown by `steps` pixels in every direction, diagonals included."""
    for _ in range(steps):
        mask = _max3x3(mask)
    return mask


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a (F, H, W) mask: every pixel labelled with its blob's largest flat index + 1.

    Labels spread by a 3x3 maximum and jump along the chain (a pixel takes its label's label), so this
    converges in a few dozen vectorised steps rather than one step per pixel of blob width.
    """
    flat = np.where(mask.ravel(), np.arange(1, mask.size + 1), 0)
    labels = flat.reshape(mask.shape)
    while True:
        spread = np.where(mask, _max3x3(labels), 0).ravel()
        spread = np.where(spread > 0, np.maximum(spread, spread[np.maximum(spread - 1, 0)]), 0)
        if np.array_equal(spread, labels.ravel()):
            return labels
        labels = spread.reshape(mask.shape)


@dataclass(frozen=True)
class _Blob:
    """The kept blob of one colour: mask (F, H, W), and per frame its area and whether that is plausible."""

    mask: np.ndarray
    area: np.ndarray
    present: np.ndarray


def _blob(mask: np.ndarray, unit: float) -> _Blob:
    """Per frame, the blob of `mask` with the most interior pixels (speckles and thin rings have few or none)."""
    F, H, W = mask.shape
    # Blurred edges of another colour over the background can blend into this colour (magenta over dark blue
    # looks purple): a ring a pixel or two thick. An opening (3x3 erosion, then dilation) removes it, so it
    # cannot join a blob it touches; one more dilation, within the mask, gives back the blob's sharp corners.
    interior = mask & ~_max3x3(~mask)
    mask = mask & _max3x3(_max3x3(interior))
    interior = mask & ~_max3x3(~mask)
    labels = _components(mask)
    ids, inverse = np.unique(labels[mask], return_inverse=True)
    area = np.bincount(inverse, minlength=len(ids))
    core = np.bincount(inverse, weights=interior[mask], minlength=len(ids))
    frame = (ids - 1) // (H * W)
    keep = np.zeros(F, np.int64)  # label kept per frame, 0 for none
    best = np.zeros(F)
    for i in np.flatnonzero(core > 0):
        score = core[i] + area[i] / (H * W + 1)  # most interior pixels; ties to the larger area
        if score > best[frame[i]]:
            best[frame[i]], keep[frame[i]] = score, ids[i]
    sel = (labels == keep[:, None, None]) & (keep[:, None, None] > 0)
    n = sel.sum(axis=(1, 2))
    return _Blob(sel, n, (n >= MIN_AREA * unit**2) & (n <= MAX_AREA * unit**2))


def _outline(mask: np.ndarray, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points (F, P, 2) on the blob's outline, midway between a blob pixel and its outside 4-neighbour; their
    weights (F, P), 0 for padding; and whether each runs along `hidden` pixels (F, P): there the edge is the
    other object's, and this object may reach further under it."""
    F = mask.shape[0]
    cracks = []
    for axis, (dx, dy) in ((2, (1.0, 0.5)), (1, (0.5, 1.0))):  # between horizontal, then vertical neighbours
        a, b = (mask[:, :, :-1], mask[:, :, 1:]) if axis == 2 else (mask[:, :-1], mask[:, 1:])
        ha, hb = (hidden[:, :, :-1], hidden[:, :, 1:]) if axis == 2 else (hidden[:, :-1], hidden[:, 1:])
        f, y, x = np.nonzero(a ^ b)
        cracks.append((f, x + dx, y + dy, (ha | hb)[f, y, x]))
    f, x, y, under = (np.concatenate(c) for c in zip(*cracks))
    order = np.argsort(f, kind="stable")
    f, x, y, under = f[order], x[order], y[order], under[order]
    counts = np.bincount(f, minlength=F)
    rank = np.arange(len(f)) - np.repeat(np.cumsum(counts) - counts, counts)
    points = np.zeros((F, max(int(counts.max(initial=0)), 1), 2))
    weight = np.zeros(points.shape[:2])
    along_hidden = np.zeros(points.shape[:2], bool)
    points[f, rank] = np.stack([x, y], axis=-1)
    weight[f, rank], along_hidden[f, rank] = 1.0, under
    return points, weight, along_hidden


_COS30 = float(np.cos(np.pi / 6))


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (< 0 inside) of offsets from the centre to a shape of size r, as `pab.data.shapes`
    draws it (arrays broadcast)."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    # Triangle, apex up: three half-planes at the inradius 0.6 r (circumradius 1.2 r).
    return np.maximum(np.maximum(dy, -_COS30 * dx - 0.5 * dy), _COS30 * dx - 0.5 * dy) - 0.6 * r


def _gradient(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Gradient (..., 3) of the signed distance in the shape's (cx, cy, r)."""
    zero = np.zeros_like(dx)
    if shape == "circle":
        d = np.maximum(np.hypot(dx, dy), 1e-6)
        return np.stack([-dx / d, -dy / d, zero - 1], axis=-1)
    if shape == "square":
        on_x = np.abs(dx) >= np.abs(dy)  # which pair of sides is nearer
        return np.stack([np.where(on_x, -np.sign(dx), zero), np.where(on_x, zero, -np.sign(dy)), zero - 1], -1)
    normals = np.array([[0.0, 1.0], [-_COS30, -0.5], [_COS30, -0.5]])  # outward: down, up-left, up-right
    side = np.stack([dy, -_COS30 * dx - 0.5 * dy, _COS30 * dx - 0.5 * dy], axis=-1).argmax(axis=-1)
    normal = normals[side]
    return np.stack([-normal[..., 0], -normal[..., 1], zero - 0.6], axis=-1)


def _fit(shape: str, outline: tuple, theta: np.ndarray, unit: float) -> np.ndarray:
    """Fit (cx, cy, r) per frame (F, 3) to the outline by damped Gauss-Newton with Huber weights (points more
    than a pixel off count less, so jagged or stray edges cannot drag the fit). Points along a hidden edge
    only need to be inside the shape: the object goes on under the other one."""
    points, weight, along_hidden = outline
    for _ in range(FIT_STEPS):
        dx, dy = points[..., 0] - theta[:, 0:1], points[..., 1] - theta[:, 1:2]
        sd = _signed_distance(shape, dx, dy, theta[:, 2:3])
        active = ~along_hidden | (sd > 0)  # a hidden-edge point inside the shape is as it should be
        sd = np.where(active, sd, 0.0)
        jac = _gradient(shape, dx, dy) * active[..., None]
        jw = jac * (weight * np.minimum(1.0, unit / np.maximum(np.abs(sd), 1e-6)))[..., None]
        normal = jw.transpose(0, 2, 1) @ jac
        damping = 1e-3 * np.trace(normal, axis1=1, axis2=2)[:, None, None] + 1e-6  # one-sided outlines
        step = np.linalg.solve(normal + damping * np.eye(3), (jw * sd[..., None]).sum(axis=1)[..., None])[..., 0]
        theta = theta - step
        theta[:, 2] = np.maximum(theta[:, 2], unit)
    return theta


def _initial_guess(shape: str, mask: np.ndarray) -> np.ndarray:
    """(cx, cy, r) per frame (F, 3) from the blob's centroid and its larger extent."""
    F, H, W = mask.shape
    n = np.maximum(mask.sum(axis=(1, 2)), 1)
    cx = (mask.sum(axis=1) * (np.arange(W) + 0.5)).sum(axis=1) / n
    cy = (mask.sum(axis=2) * (np.arange(H) + 0.5)).sum(axis=1) / n
    rows, cols = mask.any(axis=2), mask.any(axis=1)
    height = np.maximum(rows.sum(axis=1), 1)
    width = np.maximum(cols.sum(axis=1), 1)
    if shape == "triangle":  # its box is 2.08 r wide and 1.8 r high
        r = np.maximum(width / 2.08, height / 1.8)
    else:
        r = np.maximum(width, height) / 2
    return np.stack([cx, cy, r], axis=-1).astype(np.float64)


def _overlap(shape: str, theta: np.ndarray, mask: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """Intersection over union (F,) of the fitted shapes with the blob, not counting `hidden` pixels."""
    F, H, W = mask.shape
    dx = np.arange(W) + 0.5 - theta[:, 0, None, None]  # (F, 1, W): pixel centres
    dy = np.arange(H)[:, None] + 0.5 - theta[:, 1, None, None]  # (F, H, 1)
    inside = _signed_distance(shape, dx, dy, theta[:, 2, None, None]) < 0
    inter = (inside & mask).sum(axis=(1, 2))
    union = ((inside & ~hidden) | mask).sum(axis=(1, 2))
    return inter / np.maximum(union, 1)


# ----------------------------------------------------------------------------------------------------
# Decisions
# ----------------------------------------------------------------------------------------------------


def _theil_sen(t: np.ndarray, v: np.ndarray) -> float:
    """Median of the pairwise slopes: a line fit that a few outlying frames cannot drag."""
    i, j = np.triu_indices(len(t), k=1)
    return float(np.median((v[j] - v[i]) / (t[j] - t[i])))


def _classify_motion(theta: np.ndarray, frames: np.ndarray, unit: float, num_frames: int) -> tuple[str, float]:
    """("left" | "right" | "up" | "down" | "still" | "growing", speed in px/frame at 64 px) from the fits."""
    vx = _theil_sen(frames, theta[frames, 0]) / unit
    vy = _theil_sen(frames, theta[frames, 1]) / unit
    speed = float(np.hypot(vx, vy))
    if speed >= MOVING_SPEED:
        if abs(vx) >= abs(vy):
            return ("right" if vx > 0 else "left"), speed
        return ("down" if vy > 0 else "up"), speed
    growth = np.exp(_theil_sen(frames, np.log(theta[frames, 2])) * (num_frames - 1))
    return ("growing" if growth >= GROWING_SIZE_RATIO else "still"), speed


def _object_verdict(obj: ObjectSpec, blob: _Blob, hidden: np.ndarray, unit: float) -> ObjectVerdict:
    """Fit every shape to the object's blob; the best fitting one is the shape, its track the motion."""
    num_frames = len(blob.present)
    speed_asked = obj.motion in DIRECTIONS
    not_seen = ObjectVerdict(obj, False, False, False, False if speed_asked else None, None, None)
    if blob.present.mean() < PRESENT_FRACTION:
        return not_seen
    outline = _outline(blob.mask, hidden)
    _, weight, along_hidden = outline
    frames = np.flatnonzero(blob.present & ((weight * ~along_hidden).sum(axis=1) >= MIN_OUTLINE * unit))
    if len(frames) < 2:  # hidden nearly all clip long
        return not_seen
    fits = {s: _fit(s, outline, _initial_guess(s, blob.mask), unit) for s in SHAPES}
    scores = {s: float(np.median(_overlap(s, fits[s], blob.mask, hidden)[frames])) for s in SHAPES}
    shape = max(scores, key=scores.get)
    motion, speed = _classify_motion(fits[shape], frames, unit, num_frames)
    speed_ok = None
    if speed_asked:
        speed_ok = motion in DIRECTIONS and (speed > QUICK_SPEED) == (obj.speed == "quickly")
    return ObjectVerdict(obj, True, shape == obj.shape, motion == obj.motion, speed_ok, shape, motion)


__all__ = ["ObjectVerdict", "Verdict", "judge"]
