"""Cross-attention maps of chosen words, recorded from a diffusers UNet during a training step (L_AS, L_AR).

`AttentionRecorder(unet, concept_columns, word_positions)` swaps in an attention processor for the cross-attention
layers at the UNet's lowest resolution (down_blocks[-1], mid_block, up_blocks[0]: SDXL's 32x32 maps at 1024 px,
where Attend-and-Excite and A-STAR read them). The processor computes the probabilities explicitly
(`mmig_core.astar.attention_probabilities`; fast kernels never return them), keeps each sample's word-token
maps, and returns the same output the default processor would. `concept_maps(latent_hw)` aggregates them per
concept exactly as the guided sampler does (`mmig_core.astar.concept_maps`). The maps stay differentiable.
"""
from __future__ import annotations

import math
import re

import torch

from mmig_core import astar


def concept_columns(tokenizer, caption: str, concepts: list[str]) -> list[list[int]]:
    """For each concept word, the indices of its tokens among the caption's own tokens (the caption tokenised
    without special tokens, as both text paths feed it); a concept not in the caption is skipped."""
    encoded = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
    columns = []
    for word in concepts:
        found = re.search(rf"\b{re.escape(word)}\b", caption, flags=re.IGNORECASE)
        if found is None:
            continue
        tokens = [i for i, (start, end) in enumerate(encoded["offset_mapping"])
                  if start < found.end() and end > found.start()]
        if tokens:
            columns.append(tokens)
    return columns


class _Processor:
    def __init__(self, recorder: "AttentionRecorder"):
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None or attn.norm_cross or attn.group_norm \
                or attn.spatial_norm or hidden_states.dim() != 3:
            raise ValueError("the attention recorder supports SDXL's plain cross-attention layers only")
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        probs = astar.attention_probabilities(q, k, attn.heads)
        self.recorder.record(probs)
        out = attn.to_out[1](attn.to_out[0](astar.attention_output(probs, v)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class AttentionRecorder:
    def __init__(self, unet, columns: list[list[list[int]]], word_positions: list[list[int]]):
        """columns[i]: sample i's concepts, each a list of caption-token indices; word_positions[i]: where sample
        i's caption tokens sit in the UNet's context (after CLIP's start token, or from 0 for e_0's)."""
        self.unet, self.columns, self.word_positions = unet, columns, word_positions
        self.layer_maps: list[list[torch.Tensor]] = [[] for _ in columns]
        self._saved = None
        levels = len(unet.config.block_out_channels) - 1
        self.prefixes = (f"down_blocks.{levels}.", "mid_block.", "up_blocks.0.")

    def record(self, probs: torch.Tensor) -> None:
        for i, positions in enumerate(self.word_positions):
            self.layer_maps[i].append(astar.text_token_maps(probs[i:i + 1], positions))

    def __enter__(self):
        self._saved = self.unet.attn_processors
        processor = _Processor(self)
        self.unet.set_attn_processor({name: processor if name.startswith(self.prefixes) and ".attn2." in name
                                      else original for name, original in self._saved.items()})
        return self

    def __exit__(self, *exc):
        self.unet.set_attn_processor(self._saved)
        return False

    def concept_maps(self, latent_hw: tuple[int, int]) -> list[torch.Tensor | None]:
        """A_t per sample, [C, h, w] (None for a sample without concepts); clears what was recorded."""
        out = []
        for maps, columns in zip(self.layer_maps, self.columns):
            if not maps or not columns:
                out.append(None)
                continue
            factor = round(math.sqrt(latent_hw[0] * latent_hw[1] / maps[0].shape[1]))
            size = (latent_hw[0] // factor, latent_hw[1] // factor)
            out.append(astar.concept_maps(maps, size, columns)[0])
        self.layer_maps = [[] for _ in self.columns]
        return out
