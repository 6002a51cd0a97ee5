"""MLLM Describe's repetition penalty equals transformers' own on the ids the LM head emits, and survives an
input id past the head (Mllama's `<|image|>`), where transformers' processor indexes out of range on 4.x."""
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from mmig_core.generation import repetition_penalty_processor


def test_same_as_transformers_on_emittable_ids():
    torch.manual_seed(0)
    scores = torch.randn(2, 50)
    ids = torch.randint(0, 50, (2, 12))
    ours = repetition_penalty_processor(1.3)(ids, scores.clone())
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    assert torch.allclose(ours, theirs) and not torch.allclose(ours, scores)


def test_an_id_past_the_lm_head_is_skipped_not_an_index_error():
    scores = torch.tensor([[1.0, -2.0, 3.0, 4.0]])
    ids = torch.tensor([[0, 1, 4, 4]])  # 4 = the image token, one past the head's 4 logits
    assert repetition_penalty_processor(2.0)(ids, scores.clone()).tolist() == [[0.5, -4.0, 3.0, 4.0]]
    assert repetition_penalty_processor(1.0) is None
