"""Tiny Gemma 3 (google/gemma-3-4b-it's layout): a SigLIP tower with fixed position embeddings whose patch grid is
average-pooled to `mm_tokens_per_image` soft tokens, feeding a Gemma 3 decoder (tied embeddings). The chat template
writes an image as <start_of_image>; the processor expands it to "\\n\\n<start_of_image>" + 256 (here 16) x
<image_soft_token> + "<end_of_image>\\n\\n". Kept from the real model: the pooling structure (a square of
tokens, pool kernel 4), the fixed position table (so the processor must resize to exactly `image_size`), BOS both
in the template and added by the tokenizer, token_type_ids marking image rows."""
from __future__ import annotations

from pathlib import Path

from . import _common

FAMILY = "gemma3"
MODEL_TYPE = "gemma3"
IMAGE_SIZE = 64       # real: 896
PATCH = 4             # real: 14 (896 / 14 = 64 patches a side)
TOKENS_PER_IMAGE = 16  # real: 256; both a square whose side is patches-a-side / 4
TEXT_HIDDEN = 32
# Gemma's low ids: <pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4.
BASE_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
ADDED_SPECIAL = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
NAMED_TOKENS = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}

# google/gemma-3-4b-it chat_template (the same text in every Gemma 3 -it checkpoint), kept as data.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n")

FACTS = {
    "hub_id": "google/gemma-3-4b-it",
    "chat_template_source": ("google/gemma-3-4b-it tokenizer_config.json chat_template, as carried verbatim in the "
                             "GGUF metadata of ggml-org/gemma-3-*-it-GGUF and vendored by unsloth's chat_templates.py"),
    "processor_class": "Gemma3Processor",
    "image_token": "<image_soft_token>",           # the id the model scatters image features into
    "placeholder": "<start_of_image>",             # what the chat template writes for one image
    "expanded": "\n\n<start_of_image>" + "<image_soft_token>" * TOKENS_PER_IMAGE + "<end_of_image>\n\n",
    "tokens_per_image": TOKENS_PER_IMAGE,          # real: 256, fixed (pan-and-scan crops add more, off by default)
    "bos_in_template": True,                       # "<bos>" text, and the tokenizer adds <bos> too (double BOS)
    "native_size": IMAGE_SIZE, "real_native_size": 896, "fixed_position_embeddings": True,
    "per_token_inputs": ["token_type_ids"],       # 1 on image rows; required in training mode
    "resolution_kwargs": {"size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_pan_and_scan": False},
}


def gemma_tokenizer(added_special: list[str], named: dict, *, model_max_length: int = 8192):
    """A SentencePiece-style BPE as Gemma's tokenizer.json holds it: spaces normalised to "\u2581", no
    pre-tokenizer, byte fallback on (but no <0xNN> tokens in this tiny vocabulary: a character outside printable
    ASCII is <unk>), <bos> prepended. transformers 5 rebuilds exactly these parts around the saved
    vocabulary when it loads a GemmaTokenizer, so a byte-level vocabulary (the other families') would decode to
    garbage there; this one reads the same on 4.x and 5.x."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import AddedToken, GemmaTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    raw.normalizer = normalizers.Replace(" ", "\u2581")
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # every printable ASCII character and the newline (chat markers) in the base alphabet, so no text is <unk>
    alphabet = [chr(c) for c in range(33, 127)] + ["\n", "\t", "\u2581"]
    trainer = trainers.BpeTrainer(vocab_size=_common.BPE_VOCAB, special_tokens=BASE_SPECIAL, show_progress=False,
                                  initial_alphabet=alphabet)
    raw.train_from_iterator(_common.corpus(), trainer=trainer)
    raw.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                      special_tokens=[("<bos>", raw.token_to_id("<bos>"))])
    size = raw.get_vocab_size()
    assert [raw.token_to_id(t) for t in BASE_SPECIAL] == list(range(len(BASE_SPECIAL)))
    tok = GemmaTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                             pad_token="<pad>", mask_token="<mask>")
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, normalized=False, special=True)
                                                          for t in added_special]})
    tok.model_max_length = model_max_length
    assert len(tok) == size + len(added_special), f"tokenizer has {len(tok)} tokens"
    named_tokens(tok, named)
    probe = 'User:\n"A photo", of 42 cats? Yes!'
    ids = tok(probe, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == probe, tok.convert_ids_to_tokens(ids)
    return tok


def tokenizer():
    return gemma_tokenizer(ADDED_SPECIAL, NAMED_TOKENS)


def seeded_model(model_class, config, seed: int):
    """`model_class(config)` in eval mode, built under a private RNG seeded with `seed`: _common.random_init draws
    only the matrices, and some towers draw their 1-D parameters at construction (SigLIP's MLP biases)."""
    import torch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).eval()


def no_token_type_ids(tok):
    """model_input_names = input_ids + attention_mask, saved, as the real Llama 3 / tekken tokenizer_config.json
    has it: a plain fast tokenizer would otherwise return token_type_ids on 4.x, which generate() refuses."""
    names = ["input_ids", "attention_mask"]
    tok.model_input_names = names
    tok.init_kwargs["model_input_names"] = names
    return tok


def named_tokens(tok, named: dict) -> None:
    """Named model-specific special tokens (tokenizer.image_token ...), saved in tokenizer_config.json as
    `extra_special_tokens`, as the real multimodal tokenizers hold them (4.48+ and 5.x)."""
    tok._set_model_specific_special_tokens(special_tokens=dict(named))
    existing = getattr(tok, "extra_special_tokens", None)
    if isinstance(existing, dict):  # 4.x saves this dict (5.x: a list of the added tokens; the map above is saved)
        tok.extra_special_tokens = {**existing, **named}
    for key, value in named.items():
        assert str(getattr(tok, key)) == value and tok.convert_tokens_to_ids(value) != tok.unk_token_id, key


def build(folder: Path, seed: int = 0) -> Path:
    _common.require_family(MODEL_TYPE)
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor,
                              Gemma3Processor)
    tok = tokenizer()
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                max_position_embeddings=4096, sliding_window=512, pad_token_id=ids("<pad>"),
                eos_token_id=[ids("<eos>"), ids("<end_of_turn>")], bos_token_id=ids("<bos>"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE,
                          boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                          image_token_index=ids("<image_soft_token>"), tie_word_embeddings=True)
    model = seeded_model(Gemma3ForConditionalGeneration, config, seed)
    _common.random_init(model, tok, seed=seed, eos_ids=(ids("<eos>"), ids("<end_of_turn>")))
    image_processor = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=2,
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                           do_pan_and_scan=None)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                image_seq_length=TOKENS_PER_IMAGE)
    return _common.save(model, processor, folder)
