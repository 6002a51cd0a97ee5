"""What the pack's text generation (BLIP-2 captions, VLM descriptions) shares: a stop on request and
length limits that fit the model's positions. Host-agnostic: a caller passes a callable that says
whether the user asked to stop (a node passes the host's interrupt flag)."""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("ComfyUI-MMIG")


class GenerationStopped(RuntimeError):
    """Generation ended early because `stop_requested()` turned true; the caller ends its work."""


def stopping_criteria(stop_requested: Callable[[], bool] | None):
    """A transformers StoppingCriteriaList that ends generation at the next token once `stop_requested()` is
    true (checked once per generated token, so a stop acts within one forward pass); None when no callable."""
    if stop_requested is None:
        return None
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopRequested(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(stop_requested()), dtype=torch.bool,
                              device=input_ids.device)

    return StoppingCriteriaList([StopRequested()])


def repetition_penalty_processor(penalty: float):
    """A LogitsProcessorList applying the CTRL repetition penalty (transformers' `repetition_penalty`: a seen
    token's logit divided by `penalty` when positive, multiplied when negative) to the ids the language model can
    emit; None for penalty 1.

    Why not transformers' own: it gathers the scores at every input id, and a model whose image token sits past its
    LM head (Mllama: `<|image|>` = vocabulary size) makes it index out of range on transformers 4.x."""
    if penalty == 1.0:
        return None
    from transformers import LogitsProcessor, LogitsProcessorList

    class RepetitionPenalty(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            for row in range(input_ids.shape[0]):
                ids = input_ids[row][input_ids[row] < scores.shape[-1]]
                seen = scores[row, ids]
                scores[row, ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
            return scores

    return LogitsProcessorList([RepetitionPenalty()])


def raise_if_stopped(stop_requested: Callable[[], bool] | None) -> None:
    if stop_requested is not None and stop_requested():
        raise GenerationStopped("generation was interrupted")


def max_positions(config) -> int | None:
    """The language model's position limit (learned position tables index past it and fail), if it has one."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def cap_new_tokens(max_new_tokens: int, prompt_length: int, positions: int | None, *, what: str,
                   input_name: str = "max_new_tokens") -> int:
    """`max_new_tokens` lowered so prompt + response fit in `positions` (logged); an error if the prompt alone
    fills them."""
    if positions is None or prompt_length + max_new_tokens <= positions:
        return max_new_tokens
    room = positions - prompt_length
    if room < 1:
        raise ValueError(f"{what}: the prompt takes {prompt_length} tokens, the model has {positions} positions: "
                         f"shorten the prompt's text (mm_prompt) or the history.")
    log.warning("%s: %s=%d is past the model's %d positions (the prompt takes %d); generating at most %d tokens.",
                what, input_name, max_new_tokens, positions, prompt_length, room)
    return room


def truncate_text_tokens(tokenizer, text: str, max_tokens: int, *, what: str, input_name: str = "prompt") -> str:
    """`text` cut to its first `max_tokens` tokens (logged, as the host's CLIP cuts a long prompt)."""
    if not text:
        return text
    original = len(text)
    text = text[:max(0, max_tokens) * 32 + 32]  # no token is that long: tokenizing a huge text would be slow
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text if len(text) == original else tokenizer.decode(ids, skip_special_tokens=True)
    log.warning("%s: the %s is %d tokens long; keeping its first %d (the model's positions are limited).",
                what, input_name, len(ids), max(0, max_tokens))
    return tokenizer.decode(ids[:max(0, max_tokens)], skip_special_tokens=True) if max_tokens > 0 else ""
