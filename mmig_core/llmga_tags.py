"""LLMGA's generation prompt: the text an assistant writes between generation tags.

The paper writes `<gen_img>...</gen_img>`, the released code `<gen_image>...</gen_image>`; both are
accepted, in any mix. The first complete block wins (later repeats are ignored); a block nested in
another counts as part of the outer one, and tags left inside it are removed.
"""
from __future__ import annotations

import re

TAG = re.compile(r"<(/?)gen_im(?:g|age)>", re.IGNORECASE)
GENERATION_REQUEST = (" Write a detailed prompt for generating the image, between <gen_image> and </gen_image>.")


def extract_generation_prompt(response: str) -> str | None:
    """The first tagged generation prompt in `response`, stripped; None when no complete block exists."""
    depth, start = 0, None
    for match in TAG.finditer(response):
        closing = bool(match.group(1))
        if not closing:
            if depth == 0:
                start = match.end()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                inner = TAG.sub(" ", response[start:match.start()])
                return " ".join(inner.split())
    return None


def strip_tags(response: str) -> str:
    """The response with every generation tag removed (what is left when no complete block exists)."""
    return " ".join(TAG.sub(" ", response).split())
