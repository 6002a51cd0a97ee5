"""Template Browser thumbnails: each example workflow run on the tiny models, its images composed.

    python -m devtools.workflows thumbnails [--reuse] [name ...]

(`--reuse`: recompose from the images of the last run, kept in .cache/thumbnail-runs/, without running.)

Writes `example_workflows/<name>.jpg` (the frontend asks for `<name>.jpg` beside a custom node's
template). The images are what the graph really made, with tiny random-weight models, so they show
the graph's output shape (one image, raw and restored, ...), not what real weights would paint; the
banner says so.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageColor, ImageDraw, ImageFont

from devtools.paths import CACHE_DIR
from devtools.workflows import EXAMPLES_DIR, WORKFLOWS_DIR, workflow_names

SIZE = 512
BANNER = 96
RUNS_DIR = CACHE_DIR / "thumbnail-runs"  # each run's images, kept so `--reuse` recomposes without a run


MAP_H = 200  # the graph's stages and nodes, drawn small above the run's images


def _draw_map(canvas: Image.Image, ui: dict, box: tuple[int, int, int, int]) -> None:
    """The workflow's groups (in their colours) and nodes, scaled into box, as the canvas shows them."""
    from devtools.workflow_layout import node_rect
    x0, y0, x1, y1 = box
    rects = [node_rect(n) for n in ui["nodes"]] + [
        (g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2], g["bounding"][1] + g["bounding"][3])
        for g in ui["groups"]]
    left, top = min(r[0] for r in rects), min(r[1] for r in rects)
    width, height = max(r[2] for r in rects) - left, max(r[3] for r in rects) - top
    scale = min((x1 - x0) / width, (y1 - y0) / height)
    ox, oy = x0 + ((x1 - x0) - width * scale) / 2, y0 + ((y1 - y0) - height * scale) / 2
    at = lambda r: (ox + (r[0] - left) * scale, oy + (r[1] - top) * scale,
                    ox + (r[2] - left) * scale, oy + (r[3] - top) * scale)
    draw = ImageDraw.Draw(canvas)
    for group in ui["groups"]:
        x, y, w, h = group["bounding"]
        colour = ImageColor.getrgb(group["color"])
        draw.rectangle(at((x, y, x + w, y + h)), fill=tuple(c // 3 for c in colour), outline=colour, width=2)
    for node in ui["nodes"]:
        draw.rectangle(at(node_rect(node)), fill=(53, 53, 53) if node["type"] != "Note" else (102, 85, 51),
                       outline=(120, 120, 120))


def compose(name: str, images: list[Path], ui: dict | None = None) -> Image.Image:
    """The thumbnail: the graph's map (with ui), the run's images side by side, a banner naming it."""
    if not images:
        raise ValueError(f"{name}: the run wrote no image to make a thumbnail from")
    canvas = Image.new("RGB", (SIZE, SIZE), (24, 24, 28))
    top = MAP_H if ui else 0
    if ui:
        _draw_map(canvas, ui, (8, 8, SIZE - 8, MAP_H - 8))
    cell_w, cell_h = SIZE // len(images), SIZE - BANNER - top
    for index, path in enumerate(images):
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = max(cell_w / image.width, cell_h / image.height)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.LANCZOS)
            left, crop_top = (image.width - cell_w) // 2, (image.height - cell_h) // 2
            canvas.paste(image.crop((left, crop_top, left + cell_w, crop_top + cell_h)), (index * cell_w, top))
    draw = ImageDraw.Draw(canvas)
    for index in range(1, len(images)):
        draw.line((index * cell_w, top, index * cell_w, SIZE - BANNER), fill=(24, 24, 28), width=4)
    draw.text((16, SIZE - BANNER + 14), name.replace("_", " "), fill=(240, 240, 240),
              font=ImageFont.load_default(size=30))
    draw.text((16, SIZE - BANNER + 56), "ComfyUI-MMIG - graph, and its output on tiny random test models",
              fill=(170, 170, 180), font=ImageFont.load_default(size=16))
    return canvas


def main(args: list[str]) -> int:
    reuse = "--reuse" in args
    names = [a for a in args if a != "--reuse"] or workflow_names()
    failed = []
    todo = [n for n in names if not (reuse and any((RUNS_DIR / n).glob("*.png")))]
    if todo:
        from devtools.host import HostServer
        from devtools.run import run_workflow
        from devtools.tiny_models import ensure_tiny_models
        with tempfile.TemporaryDirectory() as out:
            with HostServer([ensure_tiny_models()], with_tiny_support=True, output_dir=Path(out)) as host:
                for name in todo:
                    api = json.loads((WORKFLOWS_DIR / f"{name}.api.json").read_text())
                    messages = []
                    code, files = run_workflow(host, api, tiny=True, log=messages.append)
                    images = sorted(f for f in files if f.suffix.lower() == ".png")
                    if code or not images:
                        failed.append(name)
                        print(f"{name}: no thumbnail (exit {code}):\n  " + "\n  ".join(messages), file=sys.stderr)
                        continue
                    shutil.rmtree(RUNS_DIR / name, ignore_errors=True)
                    (RUNS_DIR / name).mkdir(parents=True)
                    for index, image in enumerate(images):
                        shutil.copy(image, RUNS_DIR / name / f"{index:02d}.png")
    for name in names:
        if name in failed:
            continue
        images = sorted((RUNS_DIR / name).glob("*.png"))
        ui = json.loads((EXAMPLES_DIR / f"{name}.json").read_text())
        target = EXAMPLES_DIR / f"{name}.jpg"
        compose(name, images, ui).save(target, quality=85, optimize=True)
        print(f"wrote {target.relative_to(EXAMPLES_DIR.parent)} from {len(images)} image(s)")
    return 1 if failed else 0


ICON = EXAMPLES_DIR.parent / "docs" / "icon.png"  # [tool.comfy] Icon links to it (the registry: <= 400x400)


def make_icon() -> Image.Image:
    """The registry icon: the pack's name on the stage colours the example workflows use."""
    icon = Image.new("RGB", (400, 400), (28, 28, 34))
    draw = ImageDraw.Draw(icon)
    for index, colour in enumerate(((63, 120, 158), (136, 170, 136), (161, 48, 155), (181, 139, 42))):
        draw.rounded_rectangle((40 + index * 84, 250, 104 + index * 84, 330), radius=12, fill=colour)
    draw.text((200, 150), "MMIG", fill=(240, 240, 240), anchor="mm", font=ImageFont.load_default(size=110))
    draw.text((200, 222), "multimodal image generation", fill=(170, 170, 180), anchor="mm",
              font=ImageFont.load_default(size=22))
    return icon


if __name__ == "__main__":
    if sys.argv[1:] == ["icon"]:
        ICON.parent.mkdir(exist_ok=True)
        make_icon().save(ICON, optimize=True)
        print(f"wrote {ICON.relative_to(EXAMPLES_DIR.parent)}")
    else:
        sys.exit(main(sys.argv[1:]))
