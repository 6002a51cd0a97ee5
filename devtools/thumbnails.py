"""Template Browser thumbnails: each example workflow run on the tiny models, its images composed.

    python -m devtools.workflows thumbnails [name ...]

Writes `example_workflows/<name>.jpg` (the frontend asks for `<name>.jpg` beside a custom node's
template). The images are what the graph really made, with tiny random-weight models, so they show
the graph's output shape (one image, raw and restored, ...), not what real weights would paint; the
banner says so.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from devtools.workflows import EXAMPLES_DIR, WORKFLOWS_DIR, workflow_names

SIZE = 512
BANNER = 96


def compose(name: str, images: list[Path]) -> Image.Image:
    """The thumbnail: the run's images side by side over a banner naming the workflow."""
    if not images:
        raise ValueError(f"{name}: the run wrote no image to make a thumbnail from")
    canvas = Image.new("RGB", (SIZE, SIZE), (24, 24, 28))
    cell_w, cell_h = SIZE // len(images), SIZE - BANNER
    for index, path in enumerate(images):
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = max(cell_w / image.width, cell_h / image.height)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.LANCZOS)
            left, top = (image.width - cell_w) // 2, (image.height - cell_h) // 2
            canvas.paste(image.crop((left, top, left + cell_w, top + cell_h)), (index * cell_w, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((16, SIZE - BANNER + 14), name.replace("_", " "), fill=(240, 240, 240),
              font=ImageFont.load_default(size=30))
    draw.text((16, SIZE - BANNER + 56), "ComfyUI-MMIG - output of a tiny random-weight test run",
              fill=(170, 170, 180), font=ImageFont.load_default(size=16))
    return canvas


def main(names: list[str]) -> int:
    from devtools.host import HostServer
    from devtools.run import run_workflow
    from devtools.tiny_models import ensure_tiny_models

    names = names or workflow_names()
    failed = []
    with tempfile.TemporaryDirectory() as out:
        with HostServer([ensure_tiny_models()], with_tiny_support=True, output_dir=Path(out)) as host:
            for name in names:
                api = json.loads((WORKFLOWS_DIR / f"{name}.api.json").read_text())
                messages = []
                code, files = run_workflow(host, api, tiny=True, log=messages.append)
                images = sorted(f for f in files if f.suffix.lower() in (".png", ".jpg", ".webp"))
                if code or not images:
                    failed.append(name)
                    print(f"{name}: no thumbnail (exit {code}):\n  " + "\n  ".join(messages), file=sys.stderr)
                    continue
                target = EXAMPLES_DIR / f"{name}.jpg"
                compose(name, images).save(target, quality=85, optimize=True)
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
