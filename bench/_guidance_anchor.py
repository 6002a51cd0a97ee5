"""The anchor of bench/guidance.py: diffusers' StableDiffusionAttendAndExcitePipeline against our MODEL in
mode attend_and_excite (the same algorithm) on the same tiny SDXL UNet weights (converted with the host's
own key map), same steps, same altered steps, same prompt embeddings (the host's CLIP output passed as
prompt_embeds), maps read at the same 8x8 layers.

Not a benchmark of its own (the leading underscore keeps `make bench` from running it alone).
`ours_over_attend_excite` returns (our guided run's time over theirs, details)."""
from __future__ import annotations

import time

from bench._common import median

REPEATS = 3


def diffusers_unet(model):
    """A diffusers UNet2DConditionModel holding the host model's tiny SDXL UNet weights; SDXL's
    pooled/size conditioning (which the SD1.x pipeline does not pass) is fixed at construction."""
    import torch
    from diffusers import UNet2DConditionModel
    import comfy.utils

    unet_config = model.model.model_config.unet_config
    heads = model.model.diffusion_model.middle_block[1].transformer_blocks[0].attn2.heads
    channels = [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]
    depth = unet_config["transformer_depth"][::unet_config["num_res_blocks"][0]]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)]

    class FixedAddedConditionsUNet(UNet2DConditionModel):
        added = None

        def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
            if kwargs.get("added_cond_kwargs") is None:
                batch = sample.shape[0]
                kwargs["added_cond_kwargs"] = {k: v.expand(batch, *v.shape[1:]) for k, v in self.added.items()}
            return super().forward(sample, timestep, encoder_hidden_states, **kwargs)

    unet = FixedAddedConditionsUNet(
        sample_size=32, in_channels=4, out_channels=4, down_block_types=tuple(down), up_block_types=tuple(up),
        block_out_channels=tuple(channels), layers_per_block=unet_config["num_res_blocks"][0],
        transformer_layers_per_block=tuple(max(d, 1) for d in depth), cross_attention_dim=unet_config["context_dim"],
        attention_head_dim=tuple([heads] * len(channels)), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=unet_config["adm_in_channels"])
    comfy_sd = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    target = unet.state_dict()
    converted = {k: comfy_sd[v].clone() for k, v in mapping.items() if k in target}
    missing = set(target) - set(converted)
    if missing:
        raise RuntimeError(f"weights the key map did not cover: {sorted(missing)[:5]}")
    unet.load_state_dict(converted)
    return unet.eval().requires_grad_(False)


def ours_over_attend_excite(model, clip, conditioning, steps: int = 20, altered: int = 10):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionAttendAndExcitePipeline, StableDiffusionPipeline
    from bench import guidance as ours
    from devtools.pack import import_pack_module
    concepts_from_clip = import_pack_module("nodes._guidance").concepts_from_clip

    positive, negative = conditioning
    with torch.inference_mode(False):
        unet = diffusers_unet(model)
        pooled = positive[0][1]["pooled_output"].clone()
        size = torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]])
        unet.added = {"text_embeds": pooled, "time_ids": size}
        embeds, negative_embeds = positive[0][0].clone(), negative[0][0].clone()
        same_weights_max_diff = _max_output_difference(model, unet, embeds, pooled)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    parts = dict(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    theirs = StableDiffusionAttendAndExcitePipeline(**parts)
    plain = StableDiffusionPipeline(**parts)
    for pipe in (theirs, plain):
        pipe.set_progress_bar_config(disable=True)
    positions, _ = concepts_from_clip(clip, ours.PROMPT, ours.CONCEPTS, "")
    token_indices = [p[0] for p in positions]
    h, w = ours.LATENT[-2] * 8, ours.LATENT[-1] * 8
    common = dict(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, height=h, width=w,
                  num_inference_steps=steps, guidance_scale=5.0, output_type="latent")

    def run_theirs():
        with torch.inference_mode(False):
            theirs(token_indices=token_indices, max_iter_to_alter=altered, attn_res=(h // 32, w // 32),
                   generator=torch.Generator().manual_seed(0), **common)

    def run_plain():
        with torch.inference_mode(False), torch.no_grad():
            plain(generator=torch.Generator().manual_seed(0), **common)

    guided_model, _ = ours.guided(model, clip, guided_steps=altered, mode="attend_and_excite")  # the same algorithm
    times = {"ours": [], "theirs": [], "theirs_plain": []}
    run_theirs()
    run_plain()  # warm-ups
    for _ in range(REPEATS):
        for name, fn in (("ours", lambda: ours.sample(guided_model, conditioning, steps=steps)),
                         ("theirs", run_theirs), ("theirs_plain", run_plain)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {k: median(v) for k, v in times.items()}
    details = {"same_unet_max_abs_output_difference": same_weights_max_diff, "steps": steps, "altered_steps": altered, "token_indices": token_indices,
               "attend_excite_thresholds": "diffusers defaults {0: 0.05, 10: 0.5, 20: 0.8}",
               "seconds": {k: round(v, 3) for k, v in medians.items()},
               "theirs_over_their_plain": round(medians["theirs"] / medians["theirs_plain"], 3)}
    return round(medians["ours"] / medians["theirs"], 3), details


def _max_output_difference(model, unet, context, pooled) -> float:
    """The converted UNet against the host's on one input: the same network gives the same output."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([500.0])
    with torch.no_grad():
        adm = model.model.encode_adm(pooled_output=pooled, width=256, height=256, target_width=256,
                                     target_height=256, crop_w=0, crop_h=0, device="cpu")
        host_out = model.model.diffusion_model(x, timesteps=t, context=context, y=adm)
        theirs = unet(x, t, encoder_hidden_states=context).sample
    return float((host_out - theirs).abs().max())
