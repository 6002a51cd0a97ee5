"""Mixture-of-Modality Training's loss (MMIG Eqs. 7-8) and the teacher-forced VLM pass that also gives e_0.

    p_t = prod_s p(R_s | Z, R_{0:s-1}; theta_t, theta_a)        (Eq. 8)
    L_MMT = -1/S sum_s log p(R_s | Z, R_{0:s-1})               (Eq. 7's loss: next-token cross-entropy)

`response_inputs` builds one chat turn (image + instruction, as `vlm.describe` does at inference) followed
by the ground-truth response R; `teacher_forced` runs the model once over it and returns the logits and the
language model's last hidden states over the response tokens, which is exactly what `describe` hands to
MMSM as e_llm (e_0) at inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .mm_prompt import MMPrompt
from .vlm import VLM, chat_inputs


def response_inputs(vlm: VLM, prompt: MMPrompt, response: str, instruction: str = "") -> tuple[dict, int]:
    """The model inputs of prompt + instruction + response (ending in the tokenizer's EOS), and where R starts."""
    inputs = chat_inputs(vlm, prompt, suffix=instruction)
    tokenizer = vlm.processor.tokenizer
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    if not ids:
        raise ValueError("the response is empty: every training sample needs a caption")
    start = inputs["input_ids"].shape[1]
    response_ids = torch.tensor([ids], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], response_ids], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs, start


def teacher_forced(vlm: VLM, inputs: dict, response_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [1, L, V], hidden states over the response [1, S, H]); differentiable (MM-Adapters may train)."""
    out = vlm.model(**inputs, use_cache=False, output_hidden_states=True)
    return out.logits, out.hidden_states[-1][:, response_start:]


def batch_inputs(vlm: VLM, samples: list[tuple[dict, int]]) -> dict:
    """Several `response_inputs` right-padded into one batch (teacher forcing is causal: padding after a
    sample's last token changes none of its positions). Every sample must hold the same number of images."""
    longest = max(inputs["input_ids"].shape[1] for inputs, _ in samples)
    pad_id = vlm.processor.tokenizer.pad_token_id or 0
    batch: dict = {}
    for key in samples[0][0]:
        rows = []
        for inputs, _ in samples:
            value = inputs[key]
            if key in ("input_ids", "attention_mask"):
                fill = pad_id if key == "input_ids" else 0
                value = torch.nn.functional.pad(value, (0, longest - value.shape[1]), value=fill)
            rows.append(value)
        batch[key] = torch.cat(rows)
    return batch


def mmt_loss(logits: torch.Tensor, input_ids: torch.Tensor, response_start: int,
             response_end: int | None = None) -> torch.Tensor:
    """L_MMT: mean cross-entropy of each response token given everything before it (Eqs. 7-8).

    One sample: logits [1, L, V], input_ids [1, L]; the response is input_ids[response_start:response_end]."""
    end = input_ids.shape[1] if response_end is None else response_end
    predicted = logits[:, response_start - 1:end - 1].float()  # position s-1 predicts token s
    target = input_ids[:, response_start:end]
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), target.reshape(-1))
