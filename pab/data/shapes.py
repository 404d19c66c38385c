"""Synthetic text-to-video data: coloured shapes moving on plain backgrounds, with their captions.

Everything is made by code from a seed (no downloads), fast enough to render every training batch on
the fly, on the GPU or the CPU:

    scenes = sample_scenes(128, torch.Generator().manual_seed(0))       # training: held-out excluded
    video = render(scenes, num_frames=17, height=64, width=64, seed=0)  # (B, 3, F, H, W) in [-1, 1]
    captions = [s.caption() for s in scenes]                           # "a red circle moving left ..."

Vocabulary (`VOCABULARY` holds it as data):

* shapes: circle, square, triangle (pointing up)
* object colours: red, green, blue, yellow, cyan, magenta, orange, purple
* backgrounds: black, white, gray, dark blue, dark green
* motions: moving left / right / up / down (each "slowly" or "quickly"), staying still, growing
* one or two objects: "a red circle moving left slowly and a blue square staying still on a white background"

A scene is one or two objects on one background; the second object never shares the first's colour.
`held_out_scenes()` is a fixed set of 64 one-object scenes, one of every shape, colour, motion and
background in turn, that `sample_scenes` never draws: evaluation prompts whose combination training
never saw.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (40, 200, 50),
    "blue": (40, 80, 245),
    "yellow": (250, 225, 30),
    "cyan": (40, 220, 230),
    "magenta": (230, 40, 220),
    "orange": (250, 140, 20),
    "purple": (140, 50, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "dark blue": (15, 20, 90),
    "dark green": (10, 70, 25),
}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOTIONS = ("left", "right", "up", "down", "still", "growing")
SPEEDS: dict[str, float] = {"slowly": 1.0, "quickly": 2.0}
"""Pixels per frame at 64 px of height; scaled with the frame size."""

VOCABULARY = {
    "shapes": list(SHAPES),
    "colours": list(COLOURS),
    "backgrounds": list(BACKGROUNDS),
    "motions": [f"moving {d} {s}" for d in DIRECTIONS for s in SPEEDS] + ["staying still", "growing"],
    "objects per scene": [1, 2],
}

# Size of an object at 64 px: "radius" (half the square's side, the circle's radius) in pixels.
MIN_SIZE, MAX_SIZE = 6.0, 9.0
GROWTH = 1.8  # a growing object ends this many times its first size
NUM_HELD_OUT = 64


@dataclass(frozen=True)
class ObjectSpec:
    """One object: its shape, colour, motion ("left", ..., "still", "growing") and speed (directions only)."""

    shape: str
    colour: str
    motion: str
    speed: str | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; shapes: {', '.join(SHAPES)}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; colours: {', '.join(COLOURS)}")
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}; motions: {', '.join(MOTIONS)}")
        if (self.motion in DIRECTIONS) != (self.speed is not None) or (self.speed and self.speed not in SPEEDS):
            raise ValueError(f"motion {self.motion!r} takes speed in {list(SPEEDS)} for directions, else None")

    def phrase(self) -> str:
        if self.motion == "still":
            how = "staying still"
        elif self.motion == "growing":
            how = "growing"
        else:
            how = f"moving {self.motion} {self.speed}"
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} {how}"


@dataclass(frozen=True)
class Scene:
    """One or two objects on a plain background; `caption()` is its text."""

    objects: tuple[ObjectSpec, ...]
    background: str

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; backgrounds: {', '.join(BACKGROUNDS)}")
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")
        if len({o.colour for o in self.objects}) != len(self.objects):
            raise ValueError("the objects of a scene have different colours")

    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"


def caption_words() -> list[str]:
    """Every word (and punctuation mark) a caption can use, in a fixed order: a word-level tokenizer's vocabulary."""
    words = ["a", "an", "and", "on", "background", "moving", "staying", "still", "growing", *SPEEDS, *DIRECTIONS]
    words += [*SHAPES, *COLOURS, *(w for bg in BACKGROUNDS for w in bg.split())]
    return list(dict.fromkeys(words))


_OBJECT_RE = (
    r"an? (?P<colour>[a-z]+) (?P<shape>[a-z]+) "
    r"(?:moving (?P<dir>left|right|up|down) (?P<speed>slowly|quickly)|(?P<still>staying still)|(?P<grow>growing))"
)


def parse_caption(text: str) -> Scene:
    """The scene a caption describes; ValueError when the text is outside the vocabulary."""
    m = re.fullmatch(r"(?P<objs>.+) on a (?P<bg>[a-z ]+) background\.?", text.strip().lower())
    if m is None:
        raise ValueError(f"not a caption of the synthetic data: {text!r} (expected '... on a COLOUR background')")
    objects = []
    for part in m["objs"].split(" and "):
        o = re.fullmatch(_OBJECT_RE, part.strip())
        if o is None:
            raise ValueError(f"cannot read object {part!r} in {text!r}; e.g. 'a red circle moving left slowly'")
        motion = o["dir"] or ("still" if o["still"] else "growing")
        objects.append(ObjectSpec(o["shape"], o["colour"], motion, o["speed"]))
    return Scene(tuple(objects), m["bg"])


# ----------------------------------------------------------------------------------------------------
# Drawing scenes
# ----------------------------------------------------------------------------------------------------


def _compatible(colour: str, background: str) -> bool:
    """Blue on dark blue or green on dark green would be hard to see; never drawn."""
    return not (background.startswith("dark ") and background.endswith(colour))


def _random_object(gen: torch.Generator, exclude_colours: set[str], background: str) -> ObjectSpec:
    colours = [c for c in COLOURS if c not in exclude_colours and _compatible(c, background)]
    shape = SHAPES[_randint(gen, len(SHAPES))]
    colour = colours[_randint(gen, len(colours))]
    motion = MOTIONS[_randint(gen, len(MOTIONS))]
    speed = list(SPEEDS)[_randint(gen, len(SPEEDS))] if motion in DIRECTIONS else None
    return ObjectSpec(shape, colour, motion, speed)


def _randint(gen: torch.Generator, n: int) -> int:
    return int(torch.randint(0, n, (), generator=gen))


def held_out_scenes() -> list[Scene]:
    """64 fixed one-object scenes, cycling every shape, colour, motion (with speed) and background."""
    motions = [(d, s) for d in DIRECTIONS for s in SPEEDS] + [("still", None), ("growing", None)]  # 10
    backgrounds = list(BACKGROUNDS)
    scenes = []
    i = 0
    while len(scenes) < NUM_HELD_OUT:
        # Co-prime strides over the lists so that combinations vary rather than repeat in lockstep.
        shape = SHAPES[i % 3]
        colour = list(COLOURS)[(i * 3 + i // 8) % 8]
        motion, speed = motions[(i * 7 + i // 10) % 10]
        background = backgrounds[(i * 2 + i // 5) % 5]
        i += 1
        if not _compatible(colour, background):
            continue
        scene = Scene((ObjectSpec(shape, colour, motion, speed),), background)
        if scene not in scenes:
            scenes.append(scene)
    return scenes


_HELD_OUT = frozenset(held_out_scenes())


def is_held_out(scene: Scene) -> bool:
    return scene in _HELD_OUT


def sample_scenes(
    n: int, generator: torch.Generator, two_object_prob: float = 0.3, include_held_out: bool = False
) -> list[Scene]:
    """`n` random scenes; the held-out evaluation scenes are never drawn unless asked."""
    scenes = []
    while len(scenes) < n:
        background = list(BACKGROUNDS)[_randint(generator, len(BACKGROUNDS))]
        first = _random_object(generator, set(), background)
        objects = [first]
        if float(torch.rand((), generator=generator)) < two_object_prob:
            objects.append(_random_object(generator, {first.colour}, background))
        scene = Scene(tuple(objects), background)
        if include_held_out or not is_held_out(scene):
            scenes.append(scene)
    return scenes


@dataclass(frozen=True)
class Track:
    """Where one object is in every frame: centre x, y and size in pixels, each (F,)."""

    x: torch.Tensor
    y: torch.Tensor
    size: torch.Tensor


def plan_tracks(
    scene: Scene, num_frames: int, height: int, width: int, generator: torch.Generator
) -> list[Track]:
    """Random start sizes and positions such that every object stays inside the frame all clip long."""
    unit = height / 64.0  # sizes and speeds are defined at 64 px
    f = torch.arange(num_frames, dtype=torch.float64)
    tracks = []
    for obj in scene.objects:
        size0 = (MIN_SIZE + (MAX_SIZE - MIN_SIZE) * float(torch.rand((), generator=generator))) * unit
        grow = GROWTH if obj.motion == "growing" else 1.0
        size = size0 * (1 + (grow - 1) * f / max(num_frames - 1, 1))
        dx, dy = DIRECTIONS.get(obj.motion, (0, 0))
        step = SPEEDS[obj.speed] * unit if obj.speed else 0.0
        reach = float(size.max()) * 1.25 + 1  # the triangle reaches 1.2x its size from the centre
        span_x, span_y = dx * step * (num_frames - 1), dy * step * (num_frames - 1)
        lo_x, hi_x = reach - min(span_x, 0), width - reach - max(span_x, 0)
        lo_y, hi_y = reach - min(span_y, 0), height - reach - max(span_y, 0)
        if hi_x < lo_x or hi_y < lo_y:
            raise ValueError(f"{width}x{height} px over {num_frames} frames is too small for {obj.phrase()!r}")
        x0 = lo_x + (hi_x - lo_x) * float(torch.rand((), generator=generator))
        y0 = lo_y + (hi_y - lo_y) * float(torch.rand((), generator=generator))
        tracks.append(Track(x0 + dx * step * f, y0 + dy * step * f, size))
    return tracks


def render(
    scenes: list[Scene],
    num_frames: int = 17,
    height: int = 64,
    width: int = 64,
    seed: int | torch.Generator = 0,
    device: torch.device | str = "cpu",
    return_tracks: bool = False,
):
    """Draw `scenes` as videos (B, 3, F, H, W) in [-1, 1], float32 on `device`, anti-aliased edges.

    Positions and sizes are drawn from `seed` (an int or a CPU generator), so the same seed gives the
    same clips on every device. With `return_tracks`, also the per-object `Track`s (the ground truth).
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    tracks = [plan_tracks(s, num_frames, height, width, gen) for s in scenes]
    B = len(scenes)
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None] + 0.5  # pixel centres
    xs = torch.arange(width, device=device, dtype=torch.float32)[None, :] + 0.5
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], device=device, dtype=torch.float32) / 127.5 - 1
    video = bg[:, :, None, None, None].expand(B, 3, num_frames, height, width).clone()
    for slot in range(2):  # objects drawn in caption order: the second one on top
        idx = [b for b, s in enumerate(scenes) if len(s.objects) > slot]
        if not idx:
            continue
        objs = [scenes[b].objects[slot] for b in idx]
        cx = torch.stack([tracks[b][slot].x for b in idx]).float().to(device)[:, :, None, None]  # (n, F, 1, 1)
        cy = torch.stack([tracks[b][slot].y for b in idx]).float().to(device)[:, :, None, None]
        r = torch.stack([tracks[b][slot].size for b in idx]).float().to(device)[:, :, None, None]
        shape_id = torch.tensor([SHAPES.index(o.shape) for o in objs], device=device)[:, None, None, None]
        dist = _signed_distance(xs - cx, ys - cy, r, shape_id)  # (n, F, H, W), < 0 inside
        cover = (0.5 - dist).clamp(0, 1)[:, None]  # (n, 1, F, H, W): one pixel of anti-aliasing
        colour = torch.tensor([COLOURS[o.colour] for o in objs], device=device, dtype=torch.float32) / 127.5 - 1
        sel = torch.tensor(idx, device=device)
        video[sel] = video[sel] * (1 - cover) + colour[:, :, None, None, None] * cover
    return (video, tracks) if return_tracks else video


def _signed_distance(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor, shape_id: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance in pixels to each shape's outline (all three computed, one kept)."""
    circle = torch.sqrt(dx * dx + dy * dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - r
    # Equilateral triangle, apex up (image y grows downwards), circumradius 1.2 r: three half-planes at
    # the inradius 0.6 r, outward normals pointing down, up-left and up-right.
    c, s = math.cos(math.pi / 6), 0.5
    tri = torch.maximum(torch.maximum(dy, -c * dx - s * dy), c * dx - s * dy) - 0.6 * r
    return torch.where(shape_id == 0, circle, torch.where(shape_id == 1, square, tri))


def batches(
    batch_size: int,
    seed: int = 0,
    num_frames: int = 17,
    height: int = 64,
    width: int = 64,
    device: torch.device | str = "cpu",
    two_object_prob: float = 0.3,
):
    """Endless training batches (video (B, 3, F, H, W), captions), deterministic from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        scenes = sample_scenes(batch_size, gen, two_object_prob)
        yield render(scenes, num_frames, height, width, gen, device), [s.caption() for s in scenes]


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8 on the CPU, the layout of rendered frames."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()


__all__ = [
    "SHAPES", "COLOURS", "BACKGROUNDS", "MOTIONS", "SPEEDS", "VOCABULARY", "ObjectSpec", "Scene", "Track",
    "parse_caption", "sample_scenes", "held_out_scenes", "is_held_out", "plan_tracks", "render", "batches",
    "to_uint8",
]  # fmt: skip
