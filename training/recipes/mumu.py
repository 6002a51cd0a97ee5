"""MUMU's training (MUMU §5, Table 1): `python -m training mumu --config training/configs/mumu_stage1.yaml`.

What trains (defaults, all configurable):
    Idefics2 vision tower                 frozen
    Idefics2 vision-to-language MLP       rank-8 LoRA, lr 3e-6   (model.connector.modality_projection)
    Idefics2 language model               rank-8 LoRA, lr 3e-6   (every attention and MLP projection)
    MUMU adapter (mmig_core.mumu_adapter) fully trained, lr 1e-5
    SDXL UNet                             rank-8 LoRA, lr 5e-6   (attention projections)

One sample: the record's caption with its crops inserted before their words (plus, in stage 1, 30 % of the
time a canny/sketch/depth image of the whole input), drawn from the sample's seed (`training/mumu_prompts.py`);
before that, 70 % of its person crops become head crops, also drawn from the sample's seed
(`training.mumu_data.swap_heads`; heads below `head_min_area` keep the person crop). The step's metrics log
person_crops, head_swaps and head_too_small; `module.head_stats` sums them over the run.
The VLM (perceiver dropped, as MUMU) reads the prompt through `mmig_core.vlm`, the adapter maps its last
hidden states to SDXL's context and pooled vector exactly as MMIG MUMU Encode does at inference, and the UNet
predicts the noise of the target's latent: the SDXL denoising loss ||eps - eps_theta(z_t, t, c)||^2.

Stage 1 feeds images at `image_tokens` = 324 tokens each; stage 2 a single face or person crop at 1296 tokens.
The VLM's image resolution is sqrt(tokens) patches (capped at the vision tower's native size).

Export: a MUMU bundle folder (`mmig_core.mumu_bundle`): adapter.safetensors (the adapter format MMIG Adapter
Loader reads), unet_lora.safetensors (kohya layout, ldm names: MMIG MUMU Loader, MMIG LoRA Merge and the host's
own Load LoRA read it), vlm_lora.safetensors (peft names of the VLM's weights) and mumu_bundle.json.

Depth control images need a depth-estimation model (`depth_model`, a local Hugging Face folder); without one,
depth is left out of the control kinds (and `describe` says so): MUMU's depth maps came from a model too.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmig_core import vlm as vlm_core
from mmig_core.control_images import CONTROL_KINDS, control_image, load_depth_model
from mmig_core.lora import LoRAError, load_lora_file, save_lora_file
from mmig_core.model_files import ModelFilesError
from mmig_core.mumu_adapter import MUMUAdapter, MUMUAdapterConfig, init_adapter, load_adapter, save_adapter
from mmig_core.mumu_bundle import read_bundle, write_manifest
from training import sdxl
from training.config import ConfigError
from training.mumu_data import HEAD_MIN_AREA, HEAD_PROBABILITY, collate, open_records, swap_heads
from training.lora import inject_lora, load_lora_into, unet_lora_file_state, vlm_lora_file_state
from training.mumu_prompts import PromptRules, sample_prompt
from training.recipe import Recipe, RunContext

STAGE_TOKENS = {1: 324, 2: 1296}  # MUMU §5: tokens per image in stage 1 and stage 2
VLM_CONNECTOR_TARGETS = r"model\.connector\.modality_projection\.(gate|up|down)_proj"
VLM_LANGUAGE_TARGETS = r"model\.text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT_SEED_OFFSET = 0x5EED_0F_B0B  # prompt draws use their own stream, apart from the noise and timestep draws
HEAD_SEED_OFFSET = 0x4EAD_5EED  # and so do the head swaps: changing them leaves the prompt draws as they were


@dataclass
class RecipeConfig:
    sdxl: str = ""  # an SDXL single-file .safetensors or a diffusers folder
    vlm: str = ""  # an Idefics2-family Hugging Face folder
    data: str = ""  # records.jsonl folder (training/mumu_data.py) or the bootstrapper's output (training/data)
    stage: int = 1  # 1: up to 4 images per prompt; 2: a single high-resolution face or person crop
    image_tokens: int = 0  # tokens per image; 0: 324 in stage 1, 1296 in stage 2 (a square number)
    resolution: int = 1024  # the target image's side in px
    adapter: str = ""  # start from this adapter file; empty: a fresh adapter of the width and depth below
    init_bundle: str = ""  # continue a bundle (stage 2 after stage 1): its adapter, UNet LoRA and VLM LoRA
    adapter_width: int = 1024
    adapter_layers: int = 16
    adapter_heads: int = 16
    max_objects: int = 3
    max_images: int = 4
    control_probability: float = 0.3
    control_kinds: list[str] = field(default_factory=lambda: list(CONTROL_KINDS))
    depth_model: str = ""  # a depth-estimation folder; empty leaves depth out of control_kinds
    augment_probability: float = 0.2
    stage2_labels: list[str] = field(default_factory=lambda: ["person", "head", "face"])
    vlm_lora_rank: int = 8
    vlm_lora_alpha: float = 8.0
    unet_lora_rank: int = 8
    unet_lora_alpha: float = 8.0
    unet_lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lr_vlm_language: float = 3e-6
    lr_vlm_connector: float = 3e-6
    lr_adapter: float = 1e-5
    lr_unet: float = 5e-6
    bundle_name: str = "mumu-bundle"  # the bundle folder under the export folder (copy it to models/mmig/)
    vlm_base: str = ""  # the VLM base named in the manifest; empty: the VLM folder's name
    base_dtype: str = "fp32"  # fp32 | bf16 | fp16: the frozen VLM, UNet and VAE weights (LoRA and adapter stay fp32)
    head_probability: float = HEAD_PROBABILITY  # MUMU §4-5: person crops become head crops 70 % of the draws
    head_min_area: int = HEAD_MIN_AREA  # px; a smaller head keeps the person crop (counted as head_too_small)
    # SDXL's size conditioning in px; 0: each record's own (its size and crop). Set it to the width/height MMIG
    # MUMU Encode will be given, e.g. 768, the host's default for an SDXL prompt without sizes.
    size_conditioning: int = 0


def _check(config: RecipeConfig) -> None:
    for name in ("sdxl", "vlm", "data"):
        if not getattr(config, name):
            raise ConfigError(f"recipe.{name} is required: the path of the "
                             f"{ {'sdxl': 'SDXL checkpoint', 'vlm': 'VLM folder', 'data': 'training records'}[name]}")
    if config.stage not in STAGE_TOKENS:
        raise ConfigError(f"recipe.stage must be 1 or 2, got {config.stage}")
    unknown = [k for k in config.control_kinds if k not in CONTROL_KINDS]
    if unknown:
        raise ConfigError(f"recipe.control_kinds: unknown {unknown}; choose from {list(CONTROL_KINDS)}")
    if not 0.0 <= config.head_probability <= 1.0:
        raise ConfigError(f"recipe.head_probability must be within 0..1, got {config.head_probability}")
    if config.base_dtype not in BASE_DTYPES:
        raise ConfigError(f"recipe.base_dtype must be one of {', '.join(BASE_DTYPES)}, got {config.base_dtype!r}")
    if not Path(config.data).exists():
        raise FileNotFoundError(f"recipe.data: {config.data} does not exist (a records folder)")


def _image_resolution(tokens: int, patch: int) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ConfigError(f"recipe.image_tokens must be a square number (a side of patches), got {tokens}")
    return side * patch


class MUMUModel(torch.nn.Module):
    """VLM (+ LoRA) -> adapter -> SDXL UNet (+ LoRA); `forward(batch, step)` is the denoising loss."""

    def __init__(self, vlm: vlm_core.VLM, adapter: MUMUAdapter, parts: sdxl.SDXLParts, rules: PromptRules,
                 depth=None, head_probability: float = HEAD_PROBABILITY, head_min_area: int = HEAD_MIN_AREA):
        super().__init__()
        self.vlm_model, self.adapter, self.unet, self.vae = vlm.model, adapter, parts.unet, parts.vae
        self._vlm, self._scheduler, self._depth = vlm, parts.scheduler, depth  # plain attributes, not submodules
        self.rules = rules
        self.head_probability, self.head_min_area = head_probability, head_min_area
        self.size_conditioning = 0  # px; 0: the records' own time ids (RecipeConfig.size_conditioning)
        self.head_stats = Counter()  # person_crops, head_swaps, head_too_small over every draw of this process
        self._last_head_stats = Counter()

    def make_control(self, image: torch.Tensor, kind: str) -> torch.Tensor:
        return control_image(image, kind, self._depth)

    def prompt_generators(self, batch: dict) -> list[torch.Generator]:
        return [torch.Generator().manual_seed((int(s) + PROMPT_SEED_OFFSET) % 2**63) for s in batch["sample_seed"]]

    def head_generators(self, batch: dict) -> list[torch.Generator]:
        return [torch.Generator().manual_seed((int(s) + HEAD_SEED_OFFSET) % 2**63) for s in batch["sample_seed"]]

    def draw_crops(self, batch: dict) -> list[list]:
        """Each sample's crops with its person crops swapped for heads (MUMU §4-5), from the sample's seed."""
        stats = Counter()
        heads = batch.get("heads") or [[] for _ in batch["crops"]]
        drawn = [swap_heads(crops, sample_heads, generator, self.head_probability, self.head_min_area, stats)
                 for crops, sample_heads, generator in zip(batch["crops"], heads, self.head_generators(batch))]
        self.head_stats.update(stats)
        self._last_head_stats = stats
        return drawn

    def draw_prompts(self, batch: dict):
        """Drawn on the CPU (PIL and the processor run there), whatever device the batch went to."""
        return [sample_prompt(caption, image.cpu(), crops, self.rules, generator, self.make_control)
                for caption, image, crops, generator in zip(batch["caption"], batch["image"], self.draw_crops(batch),
                                                            self.prompt_generators(batch))]

    def conditioning(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, N, 2048], pooled [B, 1280]): the same path as MMIG MUMU Encode, with gradients."""
        states = [vlm_core.trainable_hidden_states(self._vlm, vlm_core.prompt_inputs(self._vlm, p))[0]
                  for p in prompts]
        embeds = vlm_core.pad_batch(states)
        device = next(self.adapter.parameters()).device
        return self.adapter(embeds.hidden_states.to(device), embeds.attention_mask.to(device))

    def forward(self, batch: dict, step: int = 0):
        prompts = self.draw_prompts(batch)
        context, pooled = self.conditioning([d.prompt for d in prompts])
        device = context.device
        dtype = self.unet.dtype  # the frozen base's precision (recipe.base_dtype)
        with torch.no_grad():
            latents = self.vae.encode(batch["target"].to(device, dtype))
        noisy, noise, timesteps = sdxl.add_noise(self._scheduler, latents, batch)
        time_ids = batch["time_ids"]
        if self.size_conditioning:
            s = self.size_conditioning
            time_ids = torch.tensor([s, s, 0, 0, s, s], dtype=torch.float32).expand(len(time_ids), -1)
        added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(device, dtype)}
        eps = self.unet(noisy, timesteps, context.to(dtype), added_cond_kwargs=added).sample
        loss = sdxl.denoising_loss(eps, sdxl.prediction_target(self._scheduler, latents, noise, timesteps))
        images = sum(d.prompt.image_count() for d in prompts) / len(prompts)
        heads = {name: float(self._last_head_stats[name]) for name in ("person_crops", "head_swaps", "head_too_small")}
        return loss, {"denoising": float(loss.detach()), "images_per_prompt": images, **heads}


def _named_group(module: MUMUModel, name: str):
    """The trainable parameters of one group (see `param_groups`)."""
    if name == "adapter":
        return [p for p in module.adapter.parameters() if p.requires_grad]
    if name == "unet_lora":
        return [p for n, p in module.unet.named_parameters() if p.requires_grad and "lora_" in n]
    part = "connector" if name == "vlm_connector_lora" else "text_model"
    return [p for n, p in module.vlm_model.named_parameters()
            if p.requires_grad and "lora_" in n and f".{part}." in f".{n}"]


def build(config: RecipeConfig, ctx: RunContext) -> Recipe:
    _check(config)
    tokens = config.image_tokens or STAGE_TOKENS[config.stage]
    vlm_folder = Path(config.vlm)
    # Read the patch size first: the VLM's image resolution follows from the tokens per image.
    from transformers import AutoConfig
    vision = AutoConfig.from_pretrained(vlm_folder, local_files_only=True).vision_config
    base_dtype = BASE_DTYPES[config.base_dtype]
    vlm = vlm_core.load_vlm(vlm_folder, dtype=base_dtype, drop_perceiver=True,
                            image_resolution=_image_resolution(tokens, int(vision.patch_size)))
    vlm.model.requires_grad_(False)
    inject_lora(vlm.model, config.vlm_lora_rank, config.vlm_lora_alpha,
                f"({VLM_CONNECTOR_TARGETS}|{VLM_LANGUAGE_TARGETS})")
    try:
        bundle = read_bundle(config.init_bundle) if config.init_bundle else None
    except ModelFilesError as e:
        raise ConfigError(f"recipe.init_bundle: {e}") from None
    adapter_file = bundle.adapter if bundle else config.adapter

    if adapter_file:
        adapter = load_adapter(adapter_file)
        if adapter.config.input_dim != vlm.hidden_size:
            raise ConfigError(f"the adapter {adapter_file} takes width {adapter.config.input_dim}, the VLM has "
                             f"hidden size {vlm.hidden_size}")
    else:
        adapter = init_adapter(MUMUAdapter(MUMUAdapterConfig(
            input_dim=vlm.hidden_size, width=config.adapter_width, num_layers=config.adapter_layers,
            num_heads=config.adapter_heads)), seed=ctx.seed)
    adapter.requires_grad_(True).train()

    parts = sdxl.load_sdxl(config.sdxl, dtype=base_dtype)
    inject_lora(parts.unet, config.unet_lora_rank, config.unet_lora_alpha, list(config.unet_lora_targets))
    notes = []
    if bundle:
        try:
            unet_modules = load_lora_into(parts.unet, load_lora_file(bundle.unet_lora)[0], unet=True,
                                          label=f"{bundle.unet_lora}")
            vlm_modules = (load_lora_into(vlm.model, load_lora_file(bundle.vlm_lora)[0], unet=False,
                                          label=f"{bundle.vlm_lora}") if bundle.vlm_lora else 0)
        except (ModelFilesError, LoRAError) as e:
            raise ConfigError(f"recipe.init_bundle: {e}") from None
        notes.append(f"continues bundle {bundle.folder}: adapter, {unet_modules} UNet and {vlm_modules} VLM LoRA "
                     f"modules")

    kinds = tuple(config.control_kinds)
    depth = None
    if "depth" in kinds:
        if config.depth_model:
            depth = load_depth_model(config.depth_model)
        else:
            kinds = tuple(k for k in kinds if k != "depth")
            notes.append("control images: depth left out (no recipe.depth_model configured)")
    rules = PromptRules(stage=config.stage, max_objects=config.max_objects, max_images=config.max_images,
                        control_probability=config.control_probability, control_kinds=kinds,
                        augment_probability=config.augment_probability, stage2_labels=tuple(config.stage2_labels))
    module = MUMUModel(vlm, adapter, parts, rules, depth, config.head_probability, config.head_min_area).to(ctx.device)
    module.size_conditioning = config.size_conditioning
    dataset = open_records(config.data, config.resolution,
                           require_labels=tuple(config.stage2_labels) if config.stage == 2 else ())

    learning_rates = {"vlm_language_lora": config.lr_vlm_language, "vlm_connector_lora": config.lr_vlm_connector,
                      "adapter": config.lr_adapter, "unet_lora": config.lr_unet}

    def param_groups(m: MUMUModel):
        return [{"params": _named_group(m, name), "lr": lr, "name": name} for name, lr in learning_rates.items()]

    def export(m: MUMUModel, out_dir: Path) -> list[Path]:
        folder = Path(out_dir) / config.bundle_name
        folder.mkdir(parents=True, exist_ok=True)
        save_lora_file(unet_lora_file_state(m.unet, config.unet_lora_alpha), folder / "unet_lora.safetensors")
        save_lora_file(vlm_lora_file_state(m.vlm_model, config.vlm_lora_alpha), folder / "vlm_lora.safetensors")
        adapter_path = save_adapter(m.adapter, folder / "adapter.safetensors")
        manifest = write_manifest(folder, config.vlm_base or vlm_folder.name)  # last: the bundle is complete
        return [adapter_path, folder / "unet_lora.safetensors", folder / "vlm_lora.safetensors", manifest]

    counts = {name: sum(p.numel() for p in _named_group(module, name)) for name in learning_rates}
    vision_params = sum(p.numel() for p in vlm.model.model.vision_model.parameters())
    describe = [f"MUMU stage {config.stage}: {len(dataset)} records, {vlm.tokens_per_image} tokens per image "
                f"({vlm.image_resolution} px, perceiver dropped), target {config.resolution} px",
                f"vision tower: frozen ({vision_params:,} parameters)",
                f"VLM connector MLP: rank-{config.vlm_lora_rank} LoRA, {counts['vlm_connector_lora']:,} trainable, "
                f"lr {config.lr_vlm_connector:g}",
                f"VLM language model: rank-{config.vlm_lora_rank} LoRA, {counts['vlm_language_lora']:,} trainable, "
                f"lr {config.lr_vlm_language:g}",
                f"adapter: fully trained, {counts['adapter']:,} parameters, lr {config.lr_adapter:g}",
                f"SDXL UNet: rank-{config.unet_lora_rank} LoRA on {', '.join(config.unet_lora_targets)}, "
                f"{counts['unet_lora']:,} trainable, lr {config.lr_unet:g}",
                f"VAE: frozen; prompts: control {rules.control_probability:.0%} ({', '.join(kinds) or 'none'}), "
                f"augmentation {rules.augment_probability:.0%}, at most {rules.max_images} images; person crops "
                f"become head crops {config.head_probability:.0%} of the draws (heads under {config.head_min_area} "
                f"px keep the person crop)", *notes]
    if vlm.tokens_per_image != tokens:
        describe.append(f"note: {tokens} tokens per image asked, {vlm.tokens_per_image} given (the vision tower's "
                        f"native size caps the resolution)")
    from diffusers.models.attention import BasicTransformerBlock
    from mmig_core.mumu_adapter import AdapterBlock
    decoder = type(vlm_core.decoder_layers(vlm.model)[0])
    return Recipe(module=module, param_groups=param_groups, dataset=dataset, export=export, collate=collate,
                  describe=describe, fsdp_wrap=(AdapterBlock, BasicTransformerBlock, decoder))
