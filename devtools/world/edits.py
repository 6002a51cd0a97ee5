"""Edit instructions on world scenes: "Make the circle blue." and the scene it describes.

`sample_edit(scene, seed)` picks an edit that is well defined on the scene and returns an `Edit`: the instruction
in words, the edited scene (positions kept, so the caption's left-to-right order holds) and what changed. The
kinds: recolour an object, turn it into another shape, remove it (scenes of two or more objects), change the
background. An object is named by its shape when that is unique in the scene ("the circle"), else by colour and
shape ("the red circle"). A recolour never repeats a colour already in the scene (the world's captions name each
object by a unique colour).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

from . import BACKGROUNDS, COLOURS, SHAPES, Scene, WorldObject

KINDS = ("recolour", "reshape", "remove", "background")


@dataclass(frozen=True)
class Edit:
    kind: str
    instruction: str
    scene: Scene  # the edited scene
    index: int | None  # the edited object's index in the original scene (None for a background edit)


def object_name(scene: Scene, index: int) -> str:
    """'the circle' when no other object of the scene is a circle, else 'the red circle'."""
    obj = scene.objects[index]
    if sum(o.shape == obj.shape for o in scene.objects) == 1:
        return f"the {obj.shape}"
    return f"the {obj.colour} {obj.shape}"


def recolour(scene: Scene, index: int, colour: str) -> Edit:
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; the world has {', '.join(COLOURS)}")
    if any(o.colour == colour for i, o in enumerate(scene.objects) if i != index):
        raise ValueError(f"another object of the scene is already {colour}")
    objects = list(scene.objects)
    name = object_name(scene, index)
    objects[index] = replace(objects[index], colour=colour)
    return Edit("recolour", f"Make {name} {colour}.", replace(scene, objects=tuple(objects)), index)


def reshape(scene: Scene, index: int, shape: str) -> Edit:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; the world has {', '.join(SHAPES)}")
    objects = list(scene.objects)
    name = object_name(scene, index)
    objects[index] = replace(objects[index], shape=shape)
    return Edit("reshape", f"Turn {name} into a {shape}.", replace(scene, objects=tuple(objects)), index)


def remove(scene: Scene, index: int) -> Edit:
    if len(scene.objects) < 2:
        raise ValueError("a world scene keeps at least one object: nothing to remove from a one-object scene")
    name = object_name(scene, index)
    objects = tuple(o for i, o in enumerate(scene.objects) if i != index)
    return Edit("remove", f"Remove {name}.", replace(scene, objects=objects), index)


def set_background(scene: Scene, background: str) -> Edit:
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; the world has {', '.join(BACKGROUNDS)}")
    return Edit("background", f"Make the background {background}.",
                replace(scene, background=background, background2=None), None)


def sample_edit(scene: Scene, seed: int, kinds: tuple[str, ...] = KINDS) -> Edit:
    """A random well-defined edit of `scene` (deterministic in `seed`)."""
    rng = random.Random(seed)
    choices = [k for k in kinds if k != "remove" or len(scene.objects) > 1]
    if not choices:
        raise ValueError(f"no edit of kinds {kinds} applies to a scene of {len(scene.objects)} object(s)")
    kind = rng.choice(choices)
    index = rng.randrange(len(scene.objects))
    obj: WorldObject = scene.objects[index]
    if kind == "recolour":
        used = {o.colour for o in scene.objects}
        return recolour(scene, index, rng.choice([c for c in sorted(COLOURS) if c not in used]))
    if kind == "reshape":
        return reshape(scene, index, rng.choice([s for s in SHAPES if s != obj.shape]))
    if kind == "remove":
        return remove(scene, index)
    current = {scene.background, scene.background2} if scene.background2 is None else set()
    return set_background(scene, rng.choice([b for b in sorted(BACKGROUNDS) if b not in current]))
