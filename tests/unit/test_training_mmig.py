"""The `mmig` recipe (MMIG §3.5): each stage trains a few steps on the tiny SDXL / Idefics2 / BLIP-2 on the CPU,
its loss falls, and the files it exports load through the pack's real loaders (and, for MMSM, the host's nodes)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools.paths import host_dir  # noqa: E402
from devtools.tiny_models import TINY_BLIP2, TINY_IDEFICS2, TINY_MUMU_ADAPTER, TINY_SDXL  # noqa: E402
from mmig_core.mmsm import load_mmsm  # noqa: E402
from training.mmig_data import DataError  # noqa: E402
from training.recipe import RunContext  # noqa: E402
from training.recipes import mmig  # noqa: E402

CLIP_TOKENIZER = host_dir() / "comfy" / "sd1_tokenizer"  # SDXL's CLIP tokenizer files, from the host
SAMPLES = [((200, 40, 40), "a red cat beside a blue dog", ["cat", "dog"]),
           ((40, 40, 200), "a blue dog beside a red cat", ["dog", "cat"])]


def write_pairs(folder: Path, *, manifest: bool = False, masks: bool = False) -> Path:
    """Two 40x40 image + caption pairs (a folder, or a .jsonl manifest with masks and concept words)."""
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (colour, caption, concepts) in enumerate(SAMPLES):
        Image.new("RGB", (40, 40), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
        record = {"image": f"{i}.png", "caption": caption, "concepts": concepts}
        if masks:
            mask = Image.new("L", (40, 40), 0)
            ImageDraw.Draw(mask).rectangle((8, 8, 28, 28), fill=255)
            mask.save(folder / f"{i}.mask.png")
            record["mask"] = f"{i}.mask.png"
        lines.append(json.dumps(record))
    if manifest:
        (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
        return folder / "train.jsonl"
    return folder


def tiny_config(tiny_models: Path, data: Path, stage: int, **overrides) -> mmig.RecipeConfig:
    settings = dict(stage=stage, sdxl=str(tiny_models / TINY_SDXL), vlm=str(tiny_models / TINY_IDEFICS2),
                    data=str(data), resolution=32, mmsm_width=32, mmsm_heads=2, mmsm_mlp_hidden=64, lr_mmsm=3e-3)
    return mmig.RecipeConfig(**{**settings, **overrides})


def train(config: mmig.RecipeConfig, steps: int) -> tuple[object, list[dict]]:
    """A plain optimizer loop over one fixed batch (same per-sample seeds each step: the loss must fall)."""
    recipe = mmig.build(config, RunContext(device=torch.device("cpu")))
    optimizer = torch.optim.Adam(recipe.param_groups(recipe.module))
    batch = recipe.collate([recipe.dataset[i] for i in range(len(recipe.dataset))])
    batch["sample_seed"] = [11, 12]
    history = []
    for step in range(steps):
        loss, terms = recipe.module(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({"loss": float(loss.detach()), **terms})
    return recipe, history


def falls(history: list[dict], key: str = "loss") -> bool:
    return sum(h[key] for h in history[-2:]) / 2 < history[0][key]


@pytest.fixture(scope="module")
def stage1(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mmig-stage1")
    config = tiny_config(tiny_models, write_pairs(tmp / "data"), 1, text_conditioning="clip",
                         clip_tokenizer=str(CLIP_TOKENIZER))
    recipe, history = train(config, steps=4)
    return recipe, history, recipe.export(recipe.module, tmp / "export")


def test_stage1_trains_mmsm_alone_and_its_loss_falls(stage1):
    recipe, history, _ = stage1
    assert {"sdm", "mmsm"} <= set(history[0]) and "mmt" not in history[0]
    assert falls(history) and falls(history, "mmsm")
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    trainable = {n.split(".")[0] for n, p in recipe.module.named_parameters() if p.requires_grad}
    assert trainable == {"mmsm"}
    assert recipe.describe[0] == "mmig stage 1: trains mmsm" and "1*L_sdm + 1*L_mmsm" in recipe.describe[1]
    assert recipe.module.text_encoders is not None  # the caption's CLIP conditioning, as at inference


def test_stage1_exports_an_mmsm_for_the_tiny_sdxl_and_vlm(stage1, tiny_models):
    recipe, _, written = stage1
    [path] = written
    loaded = load_mmsm(path)
    assert loaded.config.feature_channels == 64  # the tiny SDXL's mid block
    assert loaded.config.text_dim == recipe.module.vlm.hidden_size
    assert loaded.domain_decoder.weight.abs().max() > 0  # trained away from the identity
    for name, value in recipe.module.mmsm.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)


@pytest.mark.host
def test_a_just_trained_mmsm_runs_in_the_hosts_nodes(stage1, host):
    _, _, [path] = stage1
    target = host.scratch_models / "mmig" / "mmig-trained-stage1.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(path.read_bytes())
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SDXL.split("/")[-1]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0xC82828}},
        "prompt": {"class_type": "MMIG_MultimodalPrompt",
                   "inputs": {"text": "<image1> a red cat", "image1": ["img", 0]}},
        "vlm": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": TINY_IDEFICS2.split("/")[-1], "dtype": "auto",
                                                           "drop_perceiver": False, "image_resolution": 448}},
        "describe": {"class_type": "MMIG_MLLMDescribe", "inputs": {
            "vlm": ["vlm", 0], "mm_prompt": ["prompt", 0], "mode": "describe",
            "when_tags_missing": "use whole response", "max_new_tokens": 4}},
        "mmsm": {"class_type": "MMIG_MMSMLoader", "inputs": {"mmsm_name": target.name}},
        "apply": {"class_type": "MMIG_MMSMApply", "inputs": {
            "model": ["ckpt", 0], "mmsm": ["mmsm", 0], "llm_embeds": ["describe", 2], "strength": 1.0}},
    }
    for tag, model in (("plain", ["ckpt", 0]), ("mmsm", ["apply", 0])):
        graph[f"sample_{tag}"] = {"class_type": "KSampler", "inputs": {
            "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0]}}
        graph[f"save_{tag}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"sample_{tag}", 0],
                                                                       "filename_prefix": f"mmig_train/{tag}"}}
    result = host.run_graph(graph).check()
    from safetensors.torch import load_file
    latents = []
    for node in ("save_plain", "save_mmsm"):
        [item] = result.outputs[node]["latents"]
        latents.append(load_file(str(host.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"])
    assert torch.isfinite(latents[1]).all()
    assert (latents[1] - latents[0]).abs().max().item() > 0  # the trained MMSM acts inside KSampler


def test_the_batched_vlm_pass_gives_each_samples_own_e0_and_mmt(stage1):
    from mmig_core.mmt import mmt_loss, response_inputs, teacher_forced
    recipe, _, _ = stage1
    module = recipe.module
    batch = recipe.collate([recipe.dataset[0], recipe.dataset[1]])
    assert batch["caption"][0] != batch["caption"][1]
    module.terms = {**module.terms, "mmt": 1.0}
    try:
        with torch.no_grad():
            e0, mask, l_mmt = module._vlm_pass(batch["image"], batch["caption"])
            singles, losses = [], []
            for image, caption in zip(batch["image"], batch["caption"]):
                prompt = mmig.MMPrompt(segments=(0,), images=(image.permute(1, 2, 0),))
                inputs, start = response_inputs(module.vlm, prompt, caption, module.config.instruction)
                logits, hidden = teacher_forced(module.vlm, inputs, start)
                singles.append(hidden[0])
                losses.append(mmt_loss(logits, inputs["input_ids"], start))
    finally:
        module.terms = recipe.module.config.terms()
    for i, single in enumerate(singles):
        assert int(mask[i].sum()) == single.shape[0]
        assert (e0[i, :single.shape[0]] - single).abs().max() < 1e-5
    assert abs(float(l_mmt) - float(torch.stack(losses).mean())) < 1e-5


def test_stage2_trains_the_mm_adapter_on_l_mmt_and_exports_it_for_the_vlm_loader(tiny_models, tmp_path):
    from mmig_core.mm_prompt import MMPrompt
    from mmig_core.vlm import encode_prompts, load_vlm
    config = tiny_config(tiny_models, write_pairs(tmp_path / "data"), 2, lr_mm_adapter=3e-2)
    recipe, history = train(config, steps=3)
    assert "mmt" in history[0] and falls(history, "mmt") and falls(history)
    trainable = {n.split(".")[0] for n, p in recipe.module.named_parameters() if p.requires_grad}
    assert trainable == {"mmsm", "vlm_model"}
    assert all(".mm_adapters." in n for n, p in recipe.module.vlm_model.named_parameters(prefix="vlm_model.")
               if p.requires_grad)
    written = recipe.export(recipe.module, tmp_path / "export")
    assert [p.name for p in written] == ["mmsm.safetensors", "mm_adapter.safetensors"]
    folder = tiny_models / TINY_IDEFICS2
    prompt = MMPrompt(segments=("a red cat",), images=())
    plain = encode_prompts(load_vlm(folder), [prompt]).hidden_states
    adapted = encode_prompts(load_vlm(folder, mm_adapter_path=written[1]), [prompt]).hidden_states
    assert plain.shape == adapted.shape and (plain - adapted).abs().max() > 1e-6  # trained: no longer the identity


def test_stage3_trains_mmsm_and_the_unet_lora_on_eq21_with_mumu_adapter_conditioning(tiny_models, tmp_path):
    manifest = write_pairs(tmp_path / "data", manifest=True, masks=True)
    config = tiny_config(tiny_models, manifest, 3, resolution=64, text_conditioning="mumu_adapter",
                         mumu_adapter=str(tiny_models / TINY_MUMU_ADAPTER), lr_unet_lora=1e-3)
    recipe, history = train(config, steps=2)
    assert set(history[0]) == {"loss", "sdm", "mmsm", "fg", "bg", "as", "ar"}
    assert falls(history) and falls(history, "as")
    assert 0 < history[0]["as"] and 0 < history[0]["ar"]  # two concepts, real attention maps
    trainable = {n.split(".")[0] for n, p in recipe.module.named_parameters() if p.requires_grad}
    assert trainable == {"mmsm", "unet"}


def test_stage5_trains_every_term_of_eq22_and_exports_mmsm_mm_adapter_and_unet_lora(tiny_models, tmp_path):
    from safetensors import safe_open

    from mmig_core.lora import load_lora_file, match_lora
    manifest = write_pairs(tmp_path / "data", manifest=True, masks=True)
    config = tiny_config(tiny_models, manifest, 5, resolution=64, text_conditioning="clip",
                         clip_tokenizer=str(CLIP_TOKENIZER), blip2=str(tiny_models / TINY_BLIP2),
                         lr_unet_lora=1e-3, lr_mm_adapter=1e-2)
    recipe, history = train(config, steps=2)
    assert set(history[0]) == {"loss", *mmig.TERMS}
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert falls(history) and falls(history, "as") and falls(history, "mmt")
    assert 0 < history[0]["as"] and 0 < history[0]["ar"]
    assert "1*L_blip2" in recipe.describe[1]
    written = recipe.export(recipe.module, tmp_path / "export")
    assert [p.name for p in written] == ["mmsm.safetensors", "mm_adapter.safetensors", "unet_lora.safetensors"]
    with safe_open(str(tiny_models / TINY_SDXL), "pt") as f:
        shapes = {k[len("model."):]: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                  if k.startswith("model.diffusion_model.")}
    match = match_lora(load_lora_file(written[2])[0], shapes)
    assert match.matched and match.matched_fraction == 1.0, match.report()


def test_stage3_without_masks_or_attention_conditioning_is_a_clear_error(tiny_models, tmp_path):
    from training.config import ConfigError
    folder = write_pairs(tmp_path / "data")
    with pytest.raises(ConfigError, match="object mask for every sample"):
        mmig.build(tiny_config(tiny_models, folder, 3, text_conditioning="mumu_adapter",
                               mumu_adapter=str(tiny_models / TINY_MUMU_ADAPTER)),
                   RunContext(device=torch.device("cpu")))
    manifest = write_pairs(tmp_path / "masked", manifest=True, masks=True)
    with pytest.raises(ConfigError, match="set recipe.text_conditioning to clip or mumu_adapter"):
        mmig.build(tiny_config(tiny_models, manifest, 3), RunContext(device=torch.device("cpu")))


def test_a_missing_dataset_or_bad_config_is_a_clear_error(tiny_models, tmp_path):
    from training.config import ConfigError, load_config
    with pytest.raises(DataError, match="does not exist"):
        mmig.build(tiny_config(tiny_models, tmp_path / "nowhere", 1), RunContext(device=torch.device("cpu")))
    with pytest.raises(ConfigError, match="stage must be 1..5"):
        load_config(mmig.RecipeConfig, None, ["recipe.stage=6"])
    with pytest.raises(ConfigError, match="unknown part"):
        load_config(mmig.RecipeConfig, None, ["recipe.trainable=mmsm,clip"])
    with pytest.raises(ConfigError, match="unknown config key recipe.w_clip"):
        load_config(mmig.RecipeConfig, None, ["recipe.w_clip=1"])
    with pytest.raises(ConfigError, match="recipe.vlm is required"):
        mmig.build(mmig.RecipeConfig(sdxl="x", data="y"), RunContext(device=torch.device("cpu")))
    with pytest.raises(ConfigError, match="SDXL checkpoint not found"):
        mmig.build(tiny_config(tiny_models, write_pairs(tmp_path / "d"), 1, sdxl=str(tmp_path / "no.safetensors")),
                   RunContext(device=torch.device("cpu")))


def test_the_training_command_runs_the_tiny_config_and_exports_a_loadable_mmsm(tiny_models, tmp_path):
    import subprocess
    import sys

    from devtools.paths import REPO_ROOT, offline_env
    from training.mmig_data import write_synthetic_pairs
    data = write_synthetic_pairs(tmp_path / "pairs").parent
    out = tmp_path / "run"
    command = [sys.executable, "-m", "training", "mmig", "--config", str(REPO_ROOT / "training/configs/mmig_tiny.yaml"),
               f"recipe.data={data}", f"recipe.sdxl={tiny_models / TINY_SDXL}",
               f"recipe.vlm={tiny_models / TINY_IDEFICS2}", f"recipe.clip_tokenizer={CLIP_TOKENIZER}",
               f"train.out_dir={out}", "train.steps=1"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mmig stage 1: trains mmsm" in done.stderr + done.stdout
    assert load_mmsm(out / "export" / "mmsm.safetensors").config.feature_channels == 64


def test_the_training_command_reports_a_missing_dataset_as_a_usage_error(tiny_models, tmp_path, capsys):
    from devtools.paths import REPO_ROOT
    from training.__main__ import main
    code = main(["mmig", "--config", str(REPO_ROOT / "training/configs/mmig_tiny.yaml"),
                 f"recipe.data={tmp_path / 'nowhere'}",
                 f"recipe.sdxl={tiny_models / TINY_SDXL}", f"recipe.vlm={tiny_models / TINY_IDEFICS2}",
                 f"train.out_dir={tmp_path / 'run'}"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
