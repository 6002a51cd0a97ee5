"""MMIG's five training stages (MMIG paper §3.5, Eq. 22): `python -m training mmig --config <file.yaml>`.

    stage 1  MMSM alone                    L_SDM + L_MMSM                                  trains: mmsm
    stage 2  MMSM + multimodal LLM         L_SDM + L_MMSM + L_MMT                          trains: mmsm, mm_adapter
    stage 3  MMSM + DEM                    L_SDM + L_MMSM + L_fg + L_bg + L_AS + L_AR      trains: mmsm, unet_lora
    stage 4  all three                     stage 3's terms + L_MMT                         trains: all three
    stage 5  end to end, L_Total (Eq. 22)  stage 4's terms + L_BLIP2                       trains: all three

Each term has a weight (`w_<term>`, default 1 as in Eq. 22) and each trainable part a learning rate
(`lr_<part>`); `trainable` overrides a stage's set (comma-separated). One training step, per sample:

1. the frozen (or MM-Adapter-trained) VLM reads the image and `instruction`, teacher-forced on the caption
   (`mmig_core.mmt`): its last hidden states over the caption are e_0 (what MLLM Describe gives MMSM at
   inference), its logits give L_MMT;
2. the image is encoded to latents, noised at a per-sample timestep (`training.sdxl`), and the UNet predicts
   the noise with MMSM fused into its mid-block output (e_1 -> e_6, the host's output block 0); L_SDM (Eq. 14)
   and L_MMSM (Eq. 13) come out of this one pass;
3. stage 3+: L_fg / L_bg (Eqs. 17-18) are the noise error inside / outside the sample's object mask (the
   target and the reference are the training image, so M_t = M_r); L_AS / L_AR (Eqs. 19-20) come from the
   cross-attention maps of the sample's concept words (`training.mmig_attention`), A_{t-1} from a second pass
   at t - `retention_step_gap` on the same noise (the training stand-in for the next sampling step);
4. stage 5: L_BLIP2 is the caption loss of a frozen BLIP-2 on the image decoded from the x_0 the noise
   prediction implies (`mmig_core.blip2_loss`).

Text conditioning of the UNet's cross-attention (`text_conditioning`):
- `clip`: SDXL's own CLIP-L + CLIP-G on the caption, exactly the host's CLIP Text Encode (`training.sdxl`), as
  MMIG runs at inference (CLIP conditioning plus MMSM's e_0). A single-file checkpoint needs `clip_tokenizer`.
- `mumu_adapter`: e_0 through a frozen MUMU adapter (the pack's VLM -> SDXL context path, `mumu_adapter`).
- `none`: the zero conditioning (no prompt); the caption then reaches the UNet only through MMSM.
L_AS / L_AR (stages 3-5) need `clip` or `mumu_adapter`: the caption's words must have cross-attention maps.

Exports: `mmsm.safetensors` (MMIG MMSM Loader), `mm_adapter.safetensors` (the VLM loader's MM-Adapter),
`unet_lora.safetensors` (kohya layout with ldm names, as the mumu recipe writes it: MMIG LoRA Merge and the
host's Load LoRA read it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmig_core.mm_adapter import MMAdapterConfig, MMAdapterSet, save_mm_adapters
from mmig_core.mm_prompt import MMPrompt
from mmig_core.mmsm import MMSM, MMSMConfig, init_mmsm, load_mmsm, mmsm_loss, save_mmsm
from mmig_core.mmt import batch_inputs, mmt_loss, response_inputs
from mmig_core.model_files import ModelFilesError
from training import sdxl
from training.config import ConfigError
from training.mmig_data import DataError, ImageCaptionDataset, collate
from training.recipe import Recipe, RunContext, trainable_summary

PARTS = ("mmsm", "mm_adapter", "unet_lora")
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, as in mumu
TERMS = ("sdm", "mmsm", "mmt", "fg", "bg", "as", "ar", "blip2")
TEXT_CONDITIONING = ("none", "clip", "mumu_adapter")
STAGE_TRAINABLE = {1: ("mmsm",), 2: ("mmsm", "mm_adapter"), 3: ("mmsm", "unet_lora"),
                   4: PARTS, 5: PARTS}
STAGE_TERMS = {1: ("sdm", "mmsm"), 2: ("sdm", "mmsm", "mmt"), 3: ("sdm", "mmsm", "fg", "bg", "as", "ar"),
               4: ("sdm", "mmsm", "mmt", "fg", "bg", "as", "ar"), 5: TERMS}


@dataclass
class RecipeConfig:
    stage: int = 1
    sdxl: str = ""  # single-file SDXL checkpoint (.safetensors) or diffusers folder
    vlm: str = ""  # Idefics2-family folder (models/vlm/...)
    data: str = ""  # folder of image + .txt caption pairs, or a .jsonl manifest (training/mmig_data.py)
    resolution: int = 1024
    instruction: str = "Describe the image."  # the VLM's instruction; the caption is its response
    trainable: str = "auto"  # comma-separated parts (mmsm, mm_adapter, unet_lora); auto = the stage's set
    # MMSM (a new one unless mmsm_init names a file to continue from, e.g. stage 1's export)
    mmsm_init: str = ""
    mmsm_width: int = 512
    mmsm_heads: int = 8
    mmsm_mlp_hidden: int = 1024
    # MM-Adapter (stages 2, 4, 5)
    mm_adapter_init: str = ""
    mm_adapter_hidden: int = 8
    # DEM
    unet_lora_rank: int = 8
    unet_lora_init: str = ""  # continue from a unet_lora.safetensors this recipe wrote (e.g. stage 3's)
    text_conditioning: str = "none"  # none | clip | mumu_adapter (see the module doc)
    clip_tokenizer: str = ""  # clip with a single-file SDXL: a folder with CLIP's vocab.json + merges.txt
    mumu_adapter: str = ""
    retention_step_gap: int = 20
    # SDXL's size conditioning (time ids) in px; 0: the training image's size. 768 is what the host's plain CLIP
    # Text Encode gives an SDXL model (its encode_adm default), so a UNet trained that way is read the same way.
    size_conditioning: int = 0
    blip2: str = ""  # BLIP-2 folder (stage 5)
    # learning rates per trainable part
    lr_mmsm: float = 1e-4
    lr_mm_adapter: float = 1e-4
    lr_unet_lora: float = 1e-4
    # loss weights (Eq. 22 weighs every term 1)
    w_sdm: float = 1.0
    w_mmsm: float = 1.0
    w_mmt: float = 1.0
    w_fg: float = 1.0
    w_bg: float = 1.0
    w_as: float = 1.0
    w_ar: float = 1.0
    w_blip2: float = 1.0

    def __post_init__(self):
        if self.stage not in STAGE_TERMS:
            raise ValueError(f"recipe.stage must be 1..5, got {self.stage}")
        if self.text_conditioning not in TEXT_CONDITIONING:
            raise ValueError(f"recipe.text_conditioning must be one of {', '.join(TEXT_CONDITIONING)}, got "
                             f"{self.text_conditioning!r}")
        for name in PARTS:
            if name in self.trainable_parts() and getattr(self, f"lr_{name}") <= 0:
                raise ValueError(f"recipe.lr_{name} must be positive")

    def trainable_parts(self) -> tuple[str, ...]:
        if self.trainable.strip() == "auto":
            return STAGE_TRAINABLE[self.stage]
        parts = tuple(p.strip() for p in self.trainable.split(",") if p.strip())
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ValueError(f"recipe.trainable: unknown part(s) {unknown}; choose from {', '.join(PARTS)} or auto")
        return parts

    def terms(self) -> dict[str, float]:
        """The stage's loss terms with a positive weight."""
        return {t: getattr(self, f"w_{t}") for t in STAGE_TERMS[self.stage] if getattr(self, f"w_{t}") > 0}


def _require(config: RecipeConfig, *names: str) -> None:
    for name in names:
        if not getattr(config, name):
            raise ConfigError(f"recipe.{name} is required for stage {config.stage}")


class MMIGModule(torch.nn.Module):
    """Every model the stage's loss needs; `forward(batch, step)` -> (weighted loss, {term: value})."""

    def __init__(self, config: RecipeConfig, parts: sdxl.SDXLParts, vlm, mmsm: MMSM, text_encoders=None,
                 text_adapter=None, blip2=None):
        super().__init__()
        self.config, self.terms = config, config.terms()
        self.mmsm = mmsm
        self.unet, self.vae, self.scheduler = parts.unet, parts.vae, parts.scheduler
        self.vlm, self.vlm_model = vlm, vlm.model
        self.text_encoders, self.text_adapter = text_encoders, text_adapter
        self.blip2_model = None if blip2 is None else blip2.model
        self.blip2 = blip2
        self.vlm_trains = any(p.requires_grad for p in vlm.model.parameters())

    # -- step 1: the VLM ------------------------------------------------------------------------------------
    def _vlm_pass(self, images: torch.Tensor, captions: list[str]):
        """e_0 [B, S_max, H] with its mask, and L_MMT (None unless the stage has it), in one batched pass."""
        samples = []
        for image, caption in zip(images, captions):
            prompt = MMPrompt(segments=(0,), images=(image.permute(1, 2, 0).float().cpu(),))
            samples.append(response_inputs(self.vlm, prompt, caption, self.config.instruction))
        inputs = batch_inputs(self.vlm, samples)
        with torch.set_grad_enabled(self.vlm_trains and torch.is_grad_enabled()):
            out = self.vlm_model(**inputs, use_cache=False, output_hidden_states=True)
        hidden = out.hidden_states[-1]  # the normed last layer, as MLLM Describe hands it to MMSM
        states, losses = [], []
        for i, (sample_inputs, start) in enumerate(samples):
            end = sample_inputs["input_ids"].shape[1]
            states.append(hidden[i, start:end])
            if "mmt" in self.terms:
                losses.append(mmt_loss(out.logits[i:i + 1], inputs["input_ids"][i:i + 1], start, end))
        e0 = torch.nn.utils.rnn.pad_sequence(states, batch_first=True).float()
        lengths = torch.tensor([s.shape[0] for s in states], device=e0.device)
        mask = torch.arange(e0.shape[1], device=e0.device)[None] < lengths[:, None]
        return e0, mask, (torch.stack(losses).mean() if losses else None)

    def _conditioning(self, e0, e0_mask, captions, device):
        if self.text_encoders is not None:
            return self.text_encoders(captions)
        if self.text_adapter is not None:
            context, pooled = self.text_adapter(e0, e0_mask)
            return sdxl.TextConditioning(context=context, pooled=pooled)
        return sdxl.empty_text_conditioning(len(captions), self.unet, device=device)

    def _predict(self, noisy, timesteps, cond, e0, e0_mask, height, width, record=None):
        """The UNet's noise prediction with MMSM fused at the mid block; records L_MMSM into `record`."""
        def fuse(features):
            e3, e2, e4 = self.mmsm.encode(e0.to(features.dtype), e0_mask, features)
            if record is not None:
                record["mmsm"] = mmsm_loss(e3, e2, e0_mask)
            # Eq. 12, as MMSM.forward computes it (encode is reused above for Eq. 13's e_2, e_3)
            return features + self.mmsm.domain_decoder(e4).transpose(1, 2).reshape(features.shape)

        added = sdxl.added_conditioning(cond.pooled.to(noisy.dtype), height, width)
        with sdxl.mid_block_hook(self.unet, fuse):
            return self.unet(noisy, timesteps, cond.context.to(noisy.dtype), added_cond_kwargs=added).sample

    def forward(self, batch: dict, step: int = 0):
        device = next(self.mmsm.parameters()).device
        images = batch["image"].to(device)
        height, width = (self.config.size_conditioning,) * 2 if self.config.size_conditioning else images.shape[-2:]
        e0, e0_mask, l_mmt = self._vlm_pass(batch["image"], batch["caption"])
        e0, e0_mask = e0.to(device), e0_mask.to(device)
        with torch.no_grad():
            latents = self.vae.encode(images.to(next(self.vae.parameters()).dtype))
        noisy, noise, timesteps = sdxl.add_noise(self.scheduler, latents, batch)
        cond = self._conditioning(e0, e0_mask, batch["caption"], device)
        record: dict[str, torch.Tensor] = {}
        attention = self._attention_recorder(batch, e0_mask)
        with attention:
            eps = self._predict(noisy, timesteps, cond, e0, e0_mask, height, width, record)
        target = sdxl.prediction_target(self.scheduler, latents, noise, timesteps)  # eps, or v for a v-pred UNet
        terms: dict[str, torch.Tensor] = {"sdm": sdxl.denoising_loss(eps, target), "mmsm": record["mmsm"]}
        if l_mmt is not None:
            terms["mmt"] = l_mmt
        if "fg" in self.terms or "bg" in self.terms:
            terms.update(self._layered_terms(batch, eps, target))
        if "as" in self.terms or "ar" in self.terms:
            terms.update(self._attention_terms(attention, latents, noise, timesteps, cond, e0, e0_mask, height, width))
        if "blip2" in self.terms:
            from mmig_core.blip2_loss import caption_loss
            images_x0 = self.vae.decode(sdxl.predicted_x0(self.scheduler, noisy, eps, timesteps))
            terms["blip2"] = caption_loss(self.blip2, images_x0, batch["caption"])
        loss = sum(self.terms[name] * value for name, value in terms.items() if name in self.terms)
        return loss, {name: float(value.detach()) for name, value in terms.items()}

    # -- stage 3+: DEM terms ---------------------------------------------------------------------------------
    def _layered_terms(self, batch, eps, noise):  # noise: the UNet's target (eps or v)
        from mmig_core.layered_embeddings import latent_mask, masked_noise_loss
        if batch.get("mask") is None:
            raise ValueError("L_fg / L_bg need an object mask for every sample: add `<name>.mask.png` files, or "
                             "\"mask\" entries to the manifest, or set recipe.w_fg and recipe.w_bg to 0")
        mask = latent_mask(batch["mask"][:, 0].to(noise.device), noise.shape, "object mask")
        return {"fg": masked_noise_loss(noise, eps, mask), "bg": masked_noise_loss(noise, eps, 1 - mask)}

    def _attention_recorder(self, batch, e0_mask):
        from contextlib import nullcontext
        if not ({"as", "ar"} & set(self.terms)):
            return nullcontext()
        from training.mmig_attention import AttentionRecorder, concept_columns
        if self.text_encoders is not None:  # CLIP: the caption's tokens follow the start token, 75 at most
            tokenizer, first = self.text_encoders.tokenizer, 1
            counts = [min(len(tokenizer(c, add_special_tokens=False)["input_ids"]), sdxl.CLIP_TOKENS - 2)
                      for c in batch["caption"]]
        else:  # MUMU adapter: context position i is e_0's token i; e_0 ends with the EOS token
            tokenizer, first = self.vlm.processor.tokenizer, 0
            counts = [int(n) - 1 for n in e0_mask.sum(dim=1).tolist()]
        positions = [list(range(first, first + max(n, 1))) for n in counts]
        columns = [[cols for cols in concept_columns(tokenizer, caption, concepts) if max(cols) < n]
                   for caption, concepts, n in zip(batch["caption"], batch["concepts"], counts)]
        return AttentionRecorder(self.unet, columns, positions)

    def _attention_terms(self, attention, latents, noise, timesteps, cond, e0, e0_mask, height, width):
        from mmig_core.astar import binarise, retention_loss, segregation_loss
        maps = attention.concept_maps(latents.shape[-2:])  # A_t per sample, [C, h, w] (None without concepts)
        earlier = (timesteps - self.config.retention_step_gap).clamp(min=0)
        with attention:
            self._predict(self.scheduler.add_noise(latents, noise, earlier), earlier, cond, e0, e0_mask, height, width)
        next_maps = attention.concept_maps(latents.shape[-2:])  # A_{t-1}
        seg, ret = [], []
        for now, after in zip(maps, next_maps):
            if now is None:
                continue
            seg.append(segregation_loss(now[None])[0] if now.shape[0] > 1 else now.sum() * 0)
            ret.append(retention_loss(after[None], binarise(now[None]))[0])
        zero = noise.new_zeros(())
        return {"as": torch.stack(seg).mean() if seg else zero, "ar": torch.stack(ret).mean() if ret else zero}


def _new_vlm_adapters(vlm, config: RecipeConfig):
    from mmig_core.vlm import attach_vlm_mm_adapters, decoder_layers
    adapters = MMAdapterSet(MMAdapterConfig(dim=vlm.hidden_size, num_layers=len(decoder_layers(vlm.model)),
                                            hidden=config.mm_adapter_hidden))
    vlm.model.mm_adapters = adapters
    attach_vlm_mm_adapters(vlm.model, adapters)


def build(config: RecipeConfig, ctx: RunContext) -> Recipe:
    try:
        return _build(config, ctx)
    except (ModelFilesError, DataError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ConfigError(f"recipe: {e}") from e  # a model or dataset the user must fix: no traceback


def _build(config: RecipeConfig, ctx: RunContext) -> Recipe:
    from mmig_core.vlm import load_vlm
    _require(config, "sdxl", "vlm", "data")
    trainable = config.trainable_parts()
    terms = config.terms()
    if config.text_conditioning == "mumu_adapter":
        _require(config, "mumu_adapter")
    elif config.text_conditioning == "none" and {"as", "ar"} & set(terms):
        raise ConfigError("L_AS / L_AR need the UNet to attend to the caption's words: set recipe.text_conditioning "
                          "to clip or mumu_adapter, or set recipe.w_as and recipe.w_ar to 0")
    if "blip2" in terms:
        _require(config, "blip2")
    dataset = ImageCaptionDataset(config.data, config.resolution)
    if {"fg", "bg"} & set(terms) and not all(record.get("mask") for record in dataset.records):
        raise ConfigError(f"stage {config.stage}'s L_fg / L_bg need an object mask for every sample: add "
                          f"`<name>.mask.png` files or \"mask\" manifest entries to {config.data}, or set "
                          f"recipe.w_fg and recipe.w_bg to 0")
    parts = sdxl.load_sdxl(config.sdxl)
    vlm = load_vlm(config.vlm, mm_adapter_path=config.mm_adapter_init or None)
    vlm.model.requires_grad_(False)
    if "mm_adapter" in trainable:
        if getattr(vlm.model, "mm_adapters", None) is None:
            _new_vlm_adapters(vlm, config)
        vlm.model.mm_adapters.requires_grad_(True)
    feature_channels = parts.unet.config.block_out_channels[-1]  # the mid block's width
    if config.mmsm_init:
        mmsm = load_mmsm(config.mmsm_init)
        if (mmsm.config.text_dim, mmsm.config.feature_channels) != (vlm.hidden_size, feature_channels):
            raise ConfigError(f"recipe.mmsm_init {config.mmsm_init} takes e_0 of width {mmsm.config.text_dim} and "
                              f"{mmsm.config.feature_channels} UNet channels, but this VLM gives {vlm.hidden_size} and "
                              f"this UNet's mid block has {feature_channels}: continue from an MMSM for these models")
    else:
        mmsm = init_mmsm(MMSM(MMSMConfig(text_dim=vlm.hidden_size, feature_channels=feature_channels,
                                         width=config.mmsm_width, num_heads=config.mmsm_heads,
                                         mlp_hidden=config.mmsm_mlp_hidden)), seed=ctx.seed)
    mmsm.train().requires_grad_("mmsm" in trainable)
    if "unet_lora" in trainable:
        from mmig_core.lora import load_lora_file
        from training.lora import inject_lora, load_lora_into
        inject_lora(parts.unet, config.unet_lora_rank, config.unet_lora_rank, UNET_LORA_TARGETS)
        if config.unet_lora_init:
            load_lora_into(parts.unet, load_lora_file(config.unet_lora_init)[0], unet=True,
                           label=f"recipe.unet_lora_init {config.unet_lora_init}")
    text_encoders, text_adapter = None, None
    if config.text_conditioning == "clip":
        text_encoders = sdxl.load_text_encoders(config.sdxl, config.clip_tokenizer or None)
    if config.text_conditioning == "mumu_adapter":
        from mmig_core.mumu_adapter import load_adapter
        text_adapter = load_adapter(config.mumu_adapter).requires_grad_(False)
    blip2 = None
    if "blip2" in terms:
        from mmig_core.blip2 import load_blip2
        blip2 = load_blip2(config.blip2)
        blip2.model.requires_grad_(False)
    module = MMIGModule(config, parts, vlm, mmsm, text_encoders, text_adapter, blip2).to(ctx.device)

    def param_groups(m: MMIGModule):
        groups = []
        if "mmsm" in trainable:
            groups.append({"name": "mmsm", "lr": config.lr_mmsm, "params": list(m.mmsm.parameters())})
        if "mm_adapter" in trainable:
            groups.append({"name": "mm_adapter", "lr": config.lr_mm_adapter,
                           "params": list(m.vlm_model.mm_adapters.parameters())})
        if "unet_lora" in trainable:
            groups.append({"name": "unet_lora", "lr": config.lr_unet_lora,
                           "params": [p for n, p in m.unet.named_parameters() if "lora_" in n]})
        return groups

    def export(m: MMIGModule, out_dir: Path) -> list[Path]:
        out_dir = Path(out_dir)
        written = [save_mmsm(m.mmsm, out_dir / "mmsm.safetensors")]
        if "mm_adapter" in trainable:
            written.append(save_mm_adapters(m.vlm_model.mm_adapters, out_dir / "mm_adapter.safetensors"))
        if "unet_lora" in trainable:
            from mmig_core.lora import save_lora_file
            from training.lora import unet_lora_file_state
            path = out_dir / "unet_lora.safetensors"
            save_lora_file(unet_lora_file_state(m.unet, config.unet_lora_rank), path,
                           {"trained_by": "training.recipes.mmig"})
            written.append(path)
        return written

    ignored = [t for t in TERMS if t not in STAGE_TERMS[config.stage] and getattr(config, f"w_{t}") != 1.0]
    describe = [f"mmig stage {config.stage}: trains {', '.join(trainable)}",
                "loss: " + " + ".join(f"{w:g}*L_{t}" for t, w in terms.items()),
                f"text conditioning: {config.text_conditioning}; {len(dataset)} samples at {config.resolution} px",
                *trainable_summary(module)]
    if ignored:
        describe.append(f"ignored (not in stage {config.stage}): {', '.join('w_' + t for t in ignored)}")
    from diffusers.models.attention import BasicTransformerBlock

    from mmig_core.vlm import decoder_layers
    # FSDP shards the UNet's and the VLM's transformer blocks as separate units (the whole model as one unit
    # would gather every weight at once).
    fsdp_wrap = (BasicTransformerBlock, type(decoder_layers(vlm.model)[0]))
    return Recipe(module=module, param_groups=param_groups, dataset=dataset, export=export, collate=collate,
                  describe=describe, fsdp_wrap=fsdp_wrap)
