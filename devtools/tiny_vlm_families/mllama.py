"""Tiny Llama 3.2 Vision (meta-llama/Llama-3.2-11B-Vision-Instruct's layout, model type mllama): a tiled ViT
(up to 4 tiles a image, aspect-ratio embeddings, a global encoder on gated intermediate layers) whose features reach
a Llama 3 decoder only through cross-attention layers. The text holds ONE <|image|> token per image (no
expansion); `cross_attention_mask` [batch, tokens, images, tiles] says which text tokens see which image. Kept from
the real model: the tiling (max 4 tiles, the 8 supported aspect ratios), the embedding table 8 rows longer than the
LM head (<|image|> is id vocab_size, never generated), BOS both in the template and added by the tokenizer, and the
released chat template (which writes a dated system block when a conversation has no image)."""
from __future__ import annotations

from pathlib import Path

from . import _common
from .gemma3 import no_token_type_ids, seeded_model

FAMILY = "mllama"
MODEL_TYPE = "mllama"
TILE = 16            # real: 560 (each tile is resized to TILE x TILE)
PATCH = 8            # real: 14
MAX_TILES = 4        # real: 4 (the 8 default aspect ratios need exactly 4)
TEXT_HIDDEN = 32
BASE_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>"]
ADDED_SPECIAL = ["<|reserved_special_token_0|>", "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                 "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                 "<|python_tag|>", "<|image|>"]  # <|image|> last: id == text vocab_size, as in the real one

# meta-llama/Llama-3.2-11B-Vision-Instruct chat_template (verbatim, whitespace included), kept as data.
CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}      
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- Error out if there are images and system message #}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{#- System message if there are no images #}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\n\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\n\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

FACTS = {
    "hub_id": "meta-llama/Llama-3.2-11B-Vision-Instruct",
    "chat_template_source": ("meta-llama/Llama-3.2-11B-Vision-Instruct chat_template (tokenizer_config.json), as "
                             "vendored verbatim by public fine-tuning scripts (found by its 'image_ns.has_images' "
                             "and 'Prompting with images is incompatible with system messages' lines)"),
    "processor_class": "MllamaProcessor",
    "image_token": "<|image|>",
    "placeholder": "<|image|>",                    # one token per image, not expanded
    "tokens_per_image": 1,                         # in input_ids; the image itself is 1-4 tiles of cross-attention
    "tiles_per_image": (1, MAX_TILES),
    "bos_in_template": True,                       # "<|begin_of_text|>" text, and the tokenizer adds one too
    "native_size": TILE, "real_native_size": 560, "fixed_position_embeddings": True,  # per tile; tiling covers more
    "per_token_inputs": ["cross_attention_mask"],  # [B, L, n_images, max_tiles]; plus aspect_ratio_ids/_mask
    "resolution_kwargs": {"size": {"height": TILE, "width": TILE}, "max_image_tiles": MAX_TILES},
    "system_with_images": False,                   # the template raises on a system message with an image
    "date_in_text_only_prompt": True,              # "Today Date: <strftime_now>" unless date_string is passed
}


def tokenizer():
    from transformers import PreTrainedTokenizerFast
    tok = _common.train_tokenizer(base_special=BASE_SPECIAL, added_special=ADDED_SPECIAL, bos="<|begin_of_text|>",
                                  eos="<|eot_id|>", pad="<|finetune_right_pad_id|>", prepend_bos=True,
                                  tokenizer_class=PreTrainedTokenizerFast)
    return no_token_type_ids(tok)


def rope_config() -> dict:
    """Llama 3.1's scaled RoPE, as the real text config has it: 4.x names it rope_scaling + rope_theta (and
    MllamaTextConfig needs it), 5.x rope_parameters."""
    import transformers
    scaling = {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192}
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {**scaling, "rope_theta": 500000.0}}
    return {"rope_scaling": scaling, "rope_theta": 500000.0}


def build(folder: Path, seed: int = 0) -> Path:
    from transformers import (MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor,
                              MllamaProcessor)
    tok = tokenizer()
    ids = tok.convert_tokens_to_ids
    image_id = ids("<|image|>")
    assert image_id == len(tok) - 1
    # The real text vocab_size (128256) stops before <|image|>; the embedding table has vocab_size + 8 rows.
    text = dict(vocab_size=image_id, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=1, cross_attention_layers=[1],
                max_position_embeddings=131072, bos_token_id=ids("<|begin_of_text|>"),
                eos_token_id=[ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")],
                pad_token_id=ids("<|finetune_right_pad_id|>"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=2, image_size=TILE, patch_size=PATCH, max_num_tiles=MAX_TILES,
                  intermediate_layers_indices=[0, 1], vision_output_dim=32 * 3)
    text.update(rope_config())
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=image_id)
    model = seeded_model(MllamaForConditionalGeneration, config, seed)
    eos = tuple(config.text_config.eos_token_id)
    _common.random_init(model, tok, seed=seed, eos_ids=eos)
    image_processor = MllamaImageProcessor(size={"height": TILE, "width": TILE}, max_image_tiles=MAX_TILES,
                                           do_pad=True, resample=2, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                           image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = _common.processor_with_template(MllamaProcessor, CHAT_TEMPLATE, image_processor=image_processor,
                                                tokenizer=tok)
    return _common.save(model, processor, folder)
