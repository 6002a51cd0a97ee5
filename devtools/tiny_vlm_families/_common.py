"""What the tiny family builders share: a BPE tokenizer trained offline with a family's special tokens, and a
deterministic random init that keeps random responses readable."""
from __future__ import annotations

from pathlib import Path

BPE_VOCAB = 600


def require_family(model_type: str) -> None:
    """A RuntimeError naming the transformers release that added `model_type` (mmig_core.hf_compat's
    FAMILY_MIN_TRANSFORMERS) when the installed one is older: a builder says so before any import fails."""
    from mmig_core.hf_compat import FAMILY_MIN_TRANSFORMERS, FAMILY_NAMES, at_least, transformers_version
    needed = FAMILY_MIN_TRANSFORMERS.get(model_type)
    if needed and not at_least(needed):
        raise RuntimeError(f"the tiny {FAMILY_NAMES.get(model_type, model_type)} needs transformers >= {needed} "
                           f"(installed: {transformers_version()})")


def corpus() -> list[str]:
    from devtools.tiny_blip2 import CORPUS
    return CORPUS.splitlines() + ["User: describe the image. Assistant: a detailed prompt <gen_image> </gen_image>"]


def train_tokenizer(*, base_special: list[str], added_special: list[str], bos: str | None, eos: str,
                    unk: str | None = None, pad: str | None = None, prepend_bos: bool = False,
                    vocab_size: int = BPE_VOCAB, model_max_length: int = 8192, tokenizer_class=None,
                    added_plain: list[str] = ()):
    """A byte-level BPE trained on the tiny corpus. `base_special` get ids 0.. in order (a family's own low ids,
    e.g. Llama's <unk> <s> </s>); `added_special` are added after the BPE vocabulary (image tokens, chat markers),
    as the real tokenizers add them. `prepend_bos`: a post-processor puts `bos` before every text (Llama-style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token=unk))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=base_special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(corpus(), trainer=trainer)
    if prepend_bos:
        raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, raw.token_to_id(bos))])
    size = raw.get_vocab_size()
    assert size > 256 + len(base_special), f"BPE training produced only {size} tokens"
    assert [raw.token_to_id(t) for t in base_special] == list(range(len(base_special)))
    names = {key: value for key, value in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk),
                                           ("pad_token", pad)) if value is not None}
    tok = (tokenizer_class or PreTrainedTokenizerFast)(tokenizer_object=raw, **names)
    if added_special:
        tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, normalized=False, special=True)
                                                              for t in added_special]})
    if added_plain:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in added_plain])
    tok.model_max_length = model_max_length
    # Offline, a tokenizer can come out empty without any error: check it holds what was trained.
    expected = size + len(added_special) + len(added_plain)
    assert len(tok) == expected, f"tokenizer has {len(tok)} tokens, expected {expected}"
    return tok


def random_init(model, tok, *, seed: int, std: float = 0.2, eos_ids: tuple[int, ...] = ()) -> None:
    """Every matrix N(0, std) (not a version's init defaults); tokens that decode to nothing readable get a zero
    row in the LM head, so random responses stay readable text."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
        head = model.get_output_embeddings().weight
        for i in range(head.shape[0]):
            piece = tok.decode([i], skip_special_tokens=True) if i < len(tok) else ""
            if i not in eos_ids and not (piece.strip() and piece.isprintable() and "\ufffd" not in piece):
                head[i].zero_()


def processor_with_template(processor_class, chat_template: str | None, **kwargs):
    """`processor_class(**kwargs)` holding `chat_template`: passed to __init__ where it takes one, else set as the
    attribute that save_pretrained writes to chat_template.json (4.47's MllamaProcessor takes no chat_template)."""
    import inspect
    params = inspect.signature(processor_class.__init__).parameters
    takes = "chat_template" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if chat_template is None or takes:
        return processor_class(**kwargs, **({"chat_template": chat_template} if chat_template is not None else {}))
    processor = processor_class(**kwargs)
    processor.chat_template = chat_template
    return processor


def save(model, processor, folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder
