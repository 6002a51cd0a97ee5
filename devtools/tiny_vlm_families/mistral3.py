"""Tiny Mistral Small 3.1 (mistralai/Mistral-Small-3.1-24B-Instruct-2503's layout, model type mistral3): a Pixtral
ViT with 2D RoPE (dynamic resolution up to `image_size`, no fixed position table), an RMSNorm + 2x2 patch merger
projector, a Mistral decoder. The chat template writes an image as [IMG]; PixtralProcessor expands it to rows of
[IMG] tokens, each row ended by [IMG_BREAK] and the last by [IMG_END]. Kept from the real model: the tekken-style
low special-token ids ([IMG] = 10, the config's default image_token_index), the dynamic resolution (longest edge
bounded, sides rounded up to patch x merge), BOS both in the template and added by the tokenizer, and a default
system prompt carrying today's date."""
from __future__ import annotations

from pathlib import Path

from . import _common
from .gemma3 import no_token_type_ids, seeded_model

FAMILY = "mistral3"
MODEL_TYPE = "mistral3"
PATCH = 4              # real: 14
MERGE = 2              # real: 2 (a 2x2 block of patches is one token)
LONGEST_EDGE = 32      # real: 1540 (the processor's size; image_size of the tower)
TEXT_HIDDEN = 32
# tekken's first special tokens, in their real order (ids 0..19): [IMG]=10, [IMG_BREAK]=12, [IMG_END]=13.
BASE_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]

# The Mistral Small 3.x instruct chat template as transformers' tests/models/mistral3/test_processing_mistral3.py
# holds it for hf-internal-testing/Mistral-Small-3.1-24B-Instruct-2503-only-processor, kept as data.
CHAT_TEMPLATE = r"""{%- set today = strftime_now("%Y-%m-%d") %}
{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is " + today + ".\n\nWhen you're not sure about some information, you say that you don't have the information and don't make up anything.\nIf the user's question is not clear, ambiguous, or does not provide enough context for you to accurately answer the question, you do not try to answer it right away and you rather ask the user to clarify their request (e.g. \"What are some good restaurants around me?\" => \"Where are you?\" or \"When is the next flight to Tokyo\" => \"Where do you travel from?\")" %}

{{- bos_token }}

{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0] is string %}
        {%- set system_message = messages[0]['content'] %}
        {%- set loop_messages = messages[1:] %}
    {%- else %} 
        {%- set system_message = messages[0]['content'][0]['text'] %}
        {%- set loop_messages = messages[1:] %}
    {%- endif %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}

{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
            {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
            {%- else %}
                    {{- '[INST]' }}
                    {%- for block in message['content'] %}
                            {%- if block['type'] == 'text' %}
                                    {{- block['text'] }}
                            {%- elif block['type'] == 'image' or block['type'] == 'image_url' %}
                                    {{- '[IMG]' }}
                                {%- else %}
                                    {{- raise_exception('Only text and image blocks are supported in message content!') }}
                                {%- endif %}
                        {%- endfor %}
                    {{- '[/INST]' }}
                {%- endif %}
    {%- elif message['role'] == 'system' %}
        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
    {%- elif message['role'] == 'assistant' %}
        {%- if message['content'] is string %}
            {{- message['content'] + eos_token }}
        {%- else %}
            {{- message['content'][0]['text'] + eos_token }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}"""

FACTS = {
    "hub_id": "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
    "chat_template_source": ("huggingface/transformers tests/models/mistral3/test_processing_mistral3.py "
                             "prepare_processor_dict() chat_template (the processor of "
                             "hf-internal-testing/Mistral-Small-3.1-24B-Instruct-2503-only-processor)"),
    "processor_class": "PixtralProcessor",
    "image_token": "[IMG]",
    "placeholder": "[IMG]",                        # what the chat template writes for one image
    "expanded": "rows x ([IMG] x cols + [IMG_BREAK]), the last [IMG_BREAK] replaced by [IMG_END]",
    "tokens_per_image": None,                      # dynamic: (h / (patch*merge)) x (w / (patch*merge)) [IMG]
    "max_tokens_per_image": (LONGEST_EDGE // (PATCH * MERGE)) ** 2,
    "bos_in_template": True,                       # "<s>" text, and the tokenizer adds <s> too (double BOS)
    "native_size": None, "real_native_size": 1540, "fixed_position_embeddings": False,  # 2D RoPE
    "per_token_inputs": [],                        # plus image_sizes [n_images, 2] beside pixel_values
    "resolution_kwargs": {"size": {"longest_edge": LONGEST_EDGE}},  # a pixel budget: longest edge <= this
    "default_system_prompt_has_date": True,        # strftime_now("%Y-%m-%d") when no system message is given
}


def tokenizer():
    from transformers import PreTrainedTokenizerFast
    # tekken is a byte-level BPE (tiktoken); the real folder's tokenizer.json loads as a fast tokenizer too.
    tok = _common.train_tokenizer(base_special=BASE_SPECIAL, added_special=[], bos="<s>", eos="</s>", unk="<unk>",
                                  pad="<pad>", prepend_bos=True, tokenizer_class=PreTrainedTokenizerFast)
    return no_token_type_ids(tok)


def build(folder: Path, seed: int = 0) -> Path:
    _common.require_family(MODEL_TYPE)
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor,
                              PixtralProcessor)
    tok = tokenizer()
    ids = tok.convert_tokens_to_ids
    assert ids("[IMG]") == 10
    text = dict(model_type="mistral", vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                max_position_embeddings=4096, bos_token_id=ids("<s>"), eos_token_id=ids("</s>"),
                pad_token_id=ids("<pad>"), tie_word_embeddings=False)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=16, image_size=LONGEST_EDGE, patch_size=PATCH)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=ids("[IMG]"),
                            spatial_merge_size=MERGE, vision_feature_layer=-1, multimodal_projector_bias=False,
                            tie_word_embeddings=False)
    model = seeded_model(Mistral3ForConditionalGeneration, config, seed)
    _common.random_init(model, tok, seed=seed, eos_ids=(ids("</s>"),))
    image_processor = PixtralImageProcessor(size={"longest_edge": LONGEST_EDGE},
                                            patch_size={"height": PATCH, "width": PATCH})
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                                 spatial_merge_size=MERGE, chat_template=CHAT_TEMPLATE)
    return _common.save(model, processor, folder)
