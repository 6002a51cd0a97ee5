"""The scene world: 128x128 images of one to three flat shapes, simple enough to learn on a CPU and to score by rule.

Everything is deterministic from a seed. A scene is data (`Scene`); `render` draws it (image + one mask per object),
`caption` says it in words ("a red circle and a blue square on a grey background"), and `devtools.world.score`
reads an image back into objects and checks it against a caption or a scene.

The trained small models of issue 17 learn this world; the quality benchmark (`bench/quality.py`) scores them here.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np

SIZE = 128

# Saturated colours far apart in RGB, so nearest-palette segmentation is unambiguous; names are one CLIP token each.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (245, 140, 20),
    "cyan": (30, 210, 220),
}
# Backgrounds are low-saturation so they never read as an object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
MIN_SIZE, MAX_SIZE = 28, 48  # object diameter / side in pixels


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    cx: float  # centre, pixels
    cy: float
    size: float  # diameter (circle) or side (square, triangle), pixels


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: str
    background2: str | None = None  # two-tone: left half `background`, right half `background2`
    seed: int | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> "Scene":
        return Scene(objects=tuple(WorldObject(**o) for o in data["objects"]), background=data["background"],
                     background2=data.get("background2"), seed=data.get("seed"))


def sample_scene(seed: int, n_objects: int | None = None, two_tone: bool | None = None) -> Scene:
    """A random scene: 1-3 objects of distinct (shape, colour), placed without overlap, fully inside the image."""
    rng = random.Random(seed)
    n = n_objects if n_objects is not None else rng.randint(1, 3)
    if not 1 <= n <= 3:
        raise ValueError(f"a world scene has 1 to 3 objects, not {n}")
    background = rng.choice(sorted(BACKGROUNDS))
    tone = two_tone if two_tone is not None else rng.random() < 0.25
    background2 = rng.choice([b for b in sorted(BACKGROUNDS) if b != background]) if tone else None
    colours = rng.sample(sorted(COLOURS), n)  # distinct colours: a caption then names each object uniquely
    objects: list[WorldObject] = []
    for colour in colours:
        shape = rng.choice(SHAPES)
        for _ in range(200):
            size = rng.uniform(MIN_SIZE, MAX_SIZE)
            half = size / 2 + 2
            cx, cy = rng.uniform(half, SIZE - half), rng.uniform(half, SIZE - half)
            if all(math.hypot(cx - o.cx, cy - o.cy) > (size + o.size) / 2 * 1.2 + 4 for o in objects):
                break
        else:  # crowded: shrink until it fits (never fails for n <= 3 at these sizes)
            size, cx, cy = MIN_SIZE, rng.uniform(20, SIZE - 20), rng.uniform(20, SIZE - 20)
        objects.append(WorldObject(shape, colour, round(cx, 2), round(cy, 2), round(size, 2)))
    # Caption order = left to right, so "a red circle and a blue square" also says where things are.
    objects.sort(key=lambda o: o.cx)
    return Scene(tuple(objects), background, background2, seed)


def shape_mask(obj: WorldObject, size: int = SIZE) -> np.ndarray:
    """Boolean HxW mask of one object (pixel centres inside the shape)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy, r = xs - obj.cx, ys - obj.cy, obj.size / 2
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if obj.shape == "triangle":  # upright equilateral-ish: apex up, base at cy + r
        top, bottom = obj.cy - r, obj.cy + r
        t = (ys - top) / (bottom - top)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    raise ValueError(f"unknown shape {obj.shape!r}; the world has {', '.join(SHAPES)}")


def render(scene: Scene, size: int = SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    """(image uint8 HxWx3, one boolean HxW mask per object, in scene order). Later objects are drawn on top."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    if scene.background2:
        image[:, size // 2:] = BACKGROUNDS[scene.background2]
    masks = []
    for obj in scene.objects:
        mask = shape_mask(obj, size)
        image[mask] = COLOURS[obj.colour]
        masks.append(mask)
    return image, masks


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: WorldObject) -> str:
    return f"{_article(obj.colour)} {obj.colour} {obj.shape}"


def caption(scene: Scene) -> str:
    """'a red circle and a blue square on a grey background' (objects left to right)."""
    phrases = [object_phrase(o) for o in scene.objects]
    things = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if scene.background2:
        ground = f"on a {scene.background} and {scene.background2} background"
    else:
        ground = f"on a {scene.background} background"
    return f"{things} {ground}"


def to_tensor(image: np.ndarray):
    """uint8 HxWx3 -> float BHWC in [0, 1] (the host's IMAGE layout), batch of one."""
    import torch

    return torch.from_numpy(image.astype(np.float32) / 255.0)[None]


def dataset(seeds, **kwargs) -> list[tuple[Scene, np.ndarray, list[np.ndarray], str]]:
    """[(scene, image, masks, caption)] for each seed."""
    out = []
    for seed in seeds:
        scene = sample_scene(seed, **kwargs)
        image, masks = render(scene)
        out.append((scene, image, masks, caption(scene)))
    return out
