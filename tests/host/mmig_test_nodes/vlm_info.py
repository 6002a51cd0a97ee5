"""Test-only nodes that report what a loaded VLM and its embeddings are, as measured (not configured)."""


class MMIGTest_VLMInfo:
    """The VLM's family, image sizing and tokens per image, and what one chat turn of `mm_prompt` becomes: the
    number of BOS ids at its start and of image tokens in it."""
    CATEGORY = "MMIG/testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vlm": ("MMIG_VLM",), "mm_prompt": ("MMIG_MM_PROMPT",)}}

    def report(self, vlm, mm_prompt):
        return {"ui": {"vlm_info": [_report(vlm, mm_prompt)]}}


def _report(vlm, mm_prompt):
    import sys
    core = sys.modules[type(vlm.vlm).__module__]  # the pack's mmig_core.vlm, under whatever name the host gave it
    model = vlm.vlm
    inputs = core.chat_inputs(model, mm_prompt[0], history="User: hi\nAssistant: hello")
    ids = inputs["input_ids"][0].tolist()
    bos = model.processor.tokenizer.bos_token_id
    leading = 0
    while bos is not None and leading < len(ids) and ids[leading] == bos:
        leading += 1
    doubled = bos is not None and any(a == b == bos for a, b in zip(ids, ids[1:]))
    image_id = core.image_token_id(model.model, model.processor)
    plan = model.images
    return {"model_type": model.model_type, "mode": plan.mode if plan else None, "resolution": model.image_resolution,
            "tokens_per_image": model.tokens_per_image, "placeholder": model.placeholder,
            "bos_id": bos, "leading_bos": leading, "doubled_bos": doubled, "bos_total": ids.count(bos) if bos is not None else 0,
            "image_tokens": ids.count(image_id) if image_id is not None else None, "hidden_size": model.hidden_size}


class MMIGTest_EmbedsInfo:
    """An MMIG_LLM_EMBEDS' shape and real (unmasked) length per item."""
    CATEGORY = "MMIG/testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"llm_embeds": ("MMIG_LLM_EMBEDS",)}}

    def report(self, llm_embeds):
        states = llm_embeds.hidden_states
        return {"ui": {"embeds": [{"shape": list(states.shape), "lengths": llm_embeds.attention_mask.sum(1).tolist(),
                                   "finite": bool(states.isfinite().all())}]}}


NODES = {"MMIGTest_VLMInfo": MMIGTest_VLMInfo, "MMIGTest_EmbedsInfo": MMIGTest_EmbedsInfo}
