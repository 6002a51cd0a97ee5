"""Open-vocabulary detection with GroundingDINO through transformers, from a local folder.

A detection function is anything `detect(image: PIL.Image, nouns: list[str]) -> list[Detection]`;
`bootstrap(..., detect=...)` takes any such callable (tests inject a stub; another detector can be
wrapped the same way). `GroundingDinoDetector` is the default one.

Every noun goes into one text prompt, "man . dog . head .", GroundingDINO's phrase format. Each query box
is given to the noun whose tokens it scores highest on (the max token probability within the noun's
span of the prompt): unlike decoding the tokens above a threshold into a phrase string, this always
names exactly one noun of the caption.
"""
from __future__ import annotations

from pathlib import Path

from training.data.filters import Detection

SOURCE_HINT = ("Download e.g. IDEA-Research/grounding-dino-tiny or -base from Hugging Face into a folder "
               "(huggingface-cli download IDEA-Research/grounding-dino-base --local-dir DIR).")


class GroundingDinoDetector:
    """`detector(image, nouns)` -> detections with score >= `box_threshold`, boxes in image pixels."""

    def __init__(self, folder: str | Path, device: str = "auto", box_threshold: float = 0.35):
        from mmig_core.model_files import from_pretrained_strict, require_hf_folder

        folder = require_hf_folder(folder, kind="GroundingDINO", source_hint=SOURCE_HINT)  # before the slow imports
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.box_threshold = box_threshold
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        self.model = from_pretrained_strict(AutoModelForZeroShotObjectDetection, folder, torch.float32)
        self.model.eval().to(self.device)
        if self.model.config.model_type.replace("-", "_") != "grounding_dino":
            raise ValueError(f"{folder} holds a {self.model.config.model_type!r} model, not GroundingDINO")

    def prompt(self, nouns: list[str]) -> tuple[str, list[tuple[int, int]]]:
        """The text "a . b ." for nouns [a, b], and each noun's character span in it."""
        text, spans = "", []
        for noun in nouns:
            spans.append((len(text), len(text) + len(noun)))
            text += noun + " . "
        return text.strip(), spans

    def __call__(self, image, nouns: list[str]) -> list[Detection]:
        import torch

        if not nouns:
            return []
        text, spans = self.prompt([n.lower() for n in nouns])
        # Past the model's text limit the prompt is cut: the nouns beyond it are not looked for.
        limit = {"truncation": True, "max_length": self.model.config.max_text_len}
        inputs = self.processor(images=image.convert("RGB"), text=text, return_tensors="pt", **limit)
        offsets = self.processor.tokenizer(text, return_offsets_mapping=True, **limit)["offset_mapping"]
        n_tokens = inputs["input_ids"].shape[1]
        if len(offsets) != n_tokens:
            raise RuntimeError(f"the processor made {n_tokens} text tokens, its tokenizer {len(offsets)}: "
                               f"the GroundingDINO folder's processor files do not match")
        token_noun = torch.full((n_tokens,), -1, dtype=torch.long)
        for t, (start, end) in enumerate(offsets):
            if end > start:
                for index, (s, e) in enumerate(spans):
                    if start >= s and end <= e:
                        token_noun[t] = index
        with torch.no_grad():
            outputs = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        probs = outputs.logits[0].float().sigmoid().cpu()[:, :n_tokens]  # [queries, tokens]
        per_noun = torch.stack([
            probs[:, token_noun == i].max(dim=1).values if (token_noun == i).any()
            else torch.zeros(probs.shape[0]) for i in range(len(nouns))], dim=1)  # [queries, nouns]
        scores, which = per_noun.max(dim=1)
        width, height = image.size
        cx, cy, w, h = outputs.pred_boxes[0].float().cpu().unbind(-1)  # normalised centre format
        boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                             (cx + w / 2) * width, (cy + h / 2) * height], dim=-1)
        return [Detection(nouns[int(which[q])], tuple(float(v) for v in boxes[q]), float(scores[q]))
                for q in range(len(scores)) if scores[q] >= self.box_threshold]
