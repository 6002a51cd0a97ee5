"""The `mumu` recipe on the tiny Idefics2, adapter and SDXL (CPU): what trains, the loss, the written bundle."""
from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools.paths import REPO_ROOT  # noqa: E402
from devtools.tiny_lora import unet_weights  # noqa: E402
from devtools.tiny_models import TINY_IDEFICS2, TINY_MUMU_ADAPTER, TINY_SDXL  # noqa: E402
from mmig_core import vlm as vlm_core  # noqa: E402
from mmig_core.mm_prompt import build_prompt  # noqa: E402
from training.mumu_data import open_records, write_synthetic_records  # noqa: E402
from training.recipe import RunContext  # noqa: E402
from training.recipes.mumu import RecipeConfig, build  # noqa: E402

STEPS = 8
CONFIGS = REPO_ROOT / "training" / "configs"
SEEDS = torch.tensor([11, 12, 13, 14])


def tiny_config(models, data, **changes) -> RecipeConfig:
    values = dict(sdxl=str(models / TINY_SDXL), vlm=str(models / TINY_IDEFICS2), data=str(data),
                  adapter=str(models / TINY_MUMU_ADAPTER), image_tokens=4, resolution=64, lr_vlm_language=1e-3,
                  lr_vlm_connector=1e-3, lr_adapter=1e-3, lr_unet=1e-3)
    return RecipeConfig(**{**values, **changes})


def fixed_batch(recipe, indices=range(4)):
    batch = recipe.collate([recipe.dataset[i] for i in indices])
    batch["sample_seed"] = SEEDS[:len(batch["caption"])]
    return batch


def train(recipe, steps: int) -> list[float]:
    """A plain optimizer loop over one batch with fixed per-sample seeds (the engine draws new seeds each step)."""
    optimizer = torch.optim.AdamW(recipe.param_groups(recipe.module), weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss, _terms = recipe.module(fixed_batch(recipe), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of tiny ops: with the cores shared by other test runs, two threads wait on each other at every
    op (seconds per step instead of a fraction of one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mumu")
    data = write_synthetic_records(tmp / "data", count=6)
    recipe = build(tiny_config(tiny_models, data), RunContext(device=torch.device("cpu"), out_dir=tmp))
    before = {n: p.detach().clone() for n, p in recipe.module.named_parameters()}
    losses = train(recipe, STEPS)
    paths = recipe.export(recipe.module, tmp / "export")
    return SimpleNamespace(recipe=recipe, module=recipe.module, before=before, losses=losses, paths=paths,
                           bundle=tmp / "export" / "mumu-bundle", data=data, tmp=tmp)


def test_loss_falls_and_only_the_declared_parts_train(trained):
    assert trained.losses[-1] < 0.97 * trained.losses[0], trained.losses
    module = trained.module
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), trained.before[n])}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert changed <= trainable
    assert not any("vision_model" in n for n in trainable)  # the vision tower is frozen
    for part in (".connector.modality_projection.", ".text_model.layers.", "unet.", "adapter."):
        assert any(part in f".{n}" for n in changed), part
    assert all("lora_" in n for n in changed if not n.startswith("adapter."))  # base weights stay as loaded
    groups = {g["name"]: g for g in trained.recipe.param_groups(module)}
    assert {name: g["lr"] for name, g in groups.items()} == {
        "vlm_language_lora": 1e-3, "vlm_connector_lora": 1e-3, "adapter": 1e-3, "unet_lora": 1e-3}
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(trainable)  # each trainable parameter in exactly one group
    described = "\n".join(trained.recipe.describe)
    assert "vision tower: frozen" in described and "rank-8 LoRA" in described and "depth left out" in described


def test_defaults_are_mumu_table_1():
    config = RecipeConfig()
    assert (config.vlm_lora_rank, config.unet_lora_rank) == (8, 8)
    assert (config.lr_vlm_language, config.lr_vlm_connector, config.lr_adapter, config.lr_unet) == (3e-6, 3e-6,
                                                                                                   1e-5, 5e-6)
    assert (config.max_images, config.control_probability, config.augment_probability) == (4, 0.3, 0.2)
    from training.config import load_config
    stages = {name: load_config(RecipeConfig, CONFIGS / f"mumu_{name}.yaml")[0] for name in ("stage1", "stage2")}
    assert (stages["stage1"].stage, stages["stage1"].image_tokens) == (1, 324)  # MUMU §5's tokens per image
    assert (stages["stage2"].stage, stages["stage2"].image_tokens) == (2, 1296)


def test_the_training_conditioning_is_the_inference_conditioning(trained):
    module = trained.module
    prompt = build_prompt("a <image1> person next to a dog", {1: torch.rand(1, 20, 30, 3)})
    with torch.no_grad():
        context, pooled = module.conditioning([prompt])
        embeds = vlm_core.encode_prompts(module._vlm, [prompt])  # what MMIG MUMU Encode runs
        expected_context, expected_pooled = module.adapter(embeds.hidden_states, embeds.attention_mask)
    assert context.shape[-1] == 2048 and context.shape[1] % 77 == 0 and pooled.shape == (1, 1280)
    assert torch.allclose(context, expected_context, atol=1e-5) and torch.allclose(pooled, expected_pooled, atol=1e-5)


def test_same_seeds_same_loss_other_seeds_other_loss(trained):
    batch = fixed_batch(trained.recipe)
    with torch.no_grad():
        first, second = trained.module(batch)[0], trained.module(batch)[0]
        batch["sample_seed"] = SEEDS + 100
        other = trained.module(batch)[0]
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_the_bundle_loads_through_the_pack_loaders(trained, tiny_models):
    from safetensors import safe_open

    from mmig_core.lora import build_name_table, load_lora_file, match_lora
    from mmig_core.mumu_adapter import load_adapter
    from mmig_core.mumu_bundle import read_bundle

    bundle = read_bundle(trained.bundle)
    assert bundle.vlm_base == "mmig-tiny-idefics2" and bundle.vlm_lora is not None
    assert sorted(p.name for p in trained.paths) == sorted(
        ["adapter.safetensors", "unet_lora.safetensors", "vlm_lora.safetensors", "mumu_bundle.json"])
    adapter = load_adapter(bundle.adapter)
    for key, value in trained.module.adapter.state_dict().items():
        assert torch.equal(adapter.state_dict()[key], value), key

    # UNet LoRA: kohya layout, every module onto the tiny SDXL's ldm weights, and ΔW = what peft trained.
    unet_state, _ = load_lora_file(bundle.unet_lora)
    assert all(k.startswith("lora_unet_") for k in unet_state)
    base = unet_weights(tiny_models / TINY_SDXL)
    match = match_lora(unet_state, {f"diffusion_model.{k}.weight": tuple(v.shape) for k, v in base.items()})
    modules = sum(k.endswith(".lora_down.weight") for k in unet_state)
    assert modules == 11 * 8  # 11 transformer blocks in the tiny UNet, q/k/v/out of attn1 and attn2
    assert match.matched_fraction == 1.0 and len(match.matched) == modules, match.report()
    layer = trained.module.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    trained_delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    delta = match.deltas()["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"]
    assert trained_delta.abs().max() > 0 and torch.allclose(delta, trained_delta.detach(), atol=1e-7)

    # VLM LoRA: peft names of the VLM's own weights, as MMIG VLM Loader / MMIG MUMU Loader match them.
    vlm_state, _ = load_lora_file(bundle.vlm_lora)
    with safe_open(str(tiny_models / TINY_IDEFICS2 / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    vlm_match = match_lora(vlm_state, shapes, build_name_table(shapes))
    assert vlm_match.matched_fraction == 1.0 and len(vlm_match.matched) == 3 + 2 * 7, vlm_match.report()
    assert not any("vision_model" in key for _name, key in vlm_match.matched)


def test_bootstrapped_shards_feed_the_recipe(trained):
    """The dataset bootstrapper's shards (training.data) as records, with detections given for the test."""
    from training.data import shards
    from training.data.filters import Detection

    records = [json.loads(line) for line in (trained.data / "records.jsonl").read_text().splitlines()]
    pairs = trained.tmp / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"image": str(trained.data / r["image"]), "caption": r["caption"]})
                               for r in records))
    boxes = {"person": (4, 4, 24, 44), "dog": (30, 24, 48, 42), "head": (6, 4, 22, 16)}

    def detect(_image, nouns):
        return [Detection(noun, boxes[noun], 0.9) for noun in nouns if noun in boxes]

    config = shards.BootstrapConfig(shard_size=4, min_area=8 * 8)
    shards.bootstrap(pairs, trained.tmp / "shards", detect=detect, config=config, log=lambda _line: None)
    dataset = open_records(trained.tmp / "shards", resolution=64)
    assert len(dataset) == 6
    item = dataset[0]
    assert item.target.shape == (3, 64, 64) and {c.label for c in item.crops} <= {"person", "head", "object"}
    for crop in item.crops:
        assert item.caption[crop.char_index:].startswith(("person", "dog"))
    people = open_records(trained.tmp / "shards", resolution=64, require_labels=("person", "head"))
    assert len(people) == 6
    batch = trained.recipe.collate([dataset[i] for i in range(2)])
    batch["sample_seed"] = SEEDS[:2]
    before = trained.module.head_stats["person_crops"]
    with torch.no_grad():
        loss, terms = trained.module(batch)
    assert torch.isfinite(loss)
    # Head swaps are drawn at train time; these 16x12 px heads are under 150x150: person crops kept, counted.
    assert terms["person_crops"] == 2 and terms["head_swaps"] == 0 and 0 <= terms["head_too_small"] <= 2
    assert trained.module.head_stats["person_crops"] == before + 2
    module = trained.module
    saved = module.head_probability, module.head_min_area
    try:
        module.head_probability, module.head_min_area = 1.0, 16 * 12
        drawn = module.draw_crops(batch)
        assert [c.label for c in drawn[0]] == ["head", "object"] and tuple(drawn[0][0].image.shape) == (12, 16, 3)
    finally:
        module.head_probability, module.head_min_area = saved


def test_stage2_continues_the_stage1_bundle_with_one_person_crop(trained, tiny_models, tmp_path):
    stage2 = build(tiny_config(tiny_models, trained.data, stage=2, init_bundle=str(trained.bundle)),
                   RunContext(device=torch.device("cpu"), out_dir=tmp_path))
    assert any("continues bundle" in line and "88 UNet and 17 VLM LoRA" in line for line in stage2.describe)
    prompt = build_prompt("a <image1> person", {1: torch.rand(1, 20, 30, 3)})
    batch = fixed_batch(trained.recipe)
    with torch.no_grad():  # the same conditioning and the same loss: stage 2 starts where stage 1 ended
        for a, b in zip(stage2.module.conditioning([prompt]), trained.module.conditioning([prompt])):
            assert torch.allclose(a, b, atol=1e-5)
        stage1_loss = trained.module(batch)[0]
        stage2.module.rules = trained.module.rules
        assert torch.allclose(stage2.module(batch)[0], stage1_loss, atol=1e-5)
        stage2.module.rules = type(trained.module.rules)(stage=2)
    draws = stage2.module.draw_prompts(batch)
    assert all(d.prompt.image_count() == 1 and d.labels == ["person"] for d in draws)


def test_bad_config_names_what_to_fix(tiny_models, tmp_path):
    context = RunContext(device=torch.device("cpu"), out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="recipe.data"):
        build(tiny_config(tiny_models, tmp_path / "no-such-records"), context)
    with pytest.raises(ValueError, match="control_kinds"):
        build(tiny_config(tiny_models, tmp_path, control_kinds=["canny", "pencil"]), context)
    write_synthetic_records(tmp_path / "data", count=2)
    with pytest.raises(ValueError, match="square number"):
        build(tiny_config(tiny_models, tmp_path / "data", image_tokens=5), context)


def test_the_training_entry_point_trains_the_tiny_config_and_exports_a_bundle(tiny_models, tmp_path, caplog):
    """`python -m training mumu --config training/configs/mumu_tiny.yaml ...`, run in this process (its main)."""
    import logging

    from mmig_core.mumu_adapter import load_adapter
    from mmig_core.mumu_bundle import read_bundle
    from training.__main__ import main

    data = write_synthetic_records(tmp_path / "data", count=4)
    with caplog.at_level(logging.INFO, logger="training"):
        code = main(["mumu", "--config", str(CONFIGS / "mumu_tiny.yaml"), f"recipe.data={data}",
                     f"recipe.sdxl={tiny_models / TINY_SDXL}", f"recipe.vlm={tiny_models / TINY_IDEFICS2}",
                     f"recipe.adapter={tiny_models / TINY_MUMU_ADAPTER}", f"train.out_dir={tmp_path / 'run'}",
                     "train.steps=2"])
    assert code == 0
    assert "vision tower: frozen" in caplog.text and "optimizer group unet_lora" in caplog.text
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)
    bundle = read_bundle(tmp_path / "run" / "export" / "mmig-tiny-mumu-trained")
    assert load_adapter(bundle.adapter).config.input_dim == 64


def test_a_bad_recipe_value_is_a_usage_error_naming_it(tiny_models, tmp_path, capsys):
    from training.__main__ import main
    data = write_synthetic_records(tmp_path / "data", count=2)
    code = main(["mumu", "--config", str(CONFIGS / "mumu_tiny.yaml"), f"recipe.data={data}",
                 f"train.out_dir={tmp_path / 'run'}", "recipe.control_kinds=[canny, pencil]"])
    assert code == 2 and "pencil" in capsys.readouterr().err
    code = main(["mumu", "--config", str(CONFIGS / "mumu_tiny.yaml"), f"recipe.data={tmp_path / 'nothing'}",
                 f"train.out_dir={tmp_path / 'run'}"])
    assert code == 2 and "nothing" in capsys.readouterr().err


@pytest.mark.host
def test_the_trained_bundle_loads_and_samples_in_the_host(trained, host, tiny_models):
    """MMIG MUMU Loader reads the bundle training wrote; MMIG MUMU Encode then gives the training conditioning."""
    from devtools.tiny_lora import unet_weights

    name = "mmig-test-trained-mumu"
    shutil.copytree(trained.bundle, host.scratch_models / "mmig" / name, dirs_exist_ok=True)
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SDXL.split("/")[-1]}},
        "v": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": TINY_IDEFICS2.split("/")[-1], "dtype": "auto",
                                                         "drop_perceiver": True, "image_resolution": 16}},
        "i": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 24, "batch_size": 1, "color": 0x3366CC}},
        "p": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "a <image1> person next to a dog",
                                                                "image1": ["i", 0]}},
        "b": {"class_type": "MMIG_MUMULoader", "inputs": {"bundle_name": name, "model": ["1", 0], "vlm": ["v", 0],
                                                          "unet_strength": 1.0, "vlm_strength": 1.0, "dtype": "auto"}},
        "e": {"class_type": "MMIG_MUMUEncode", "inputs": {"vlm": ["b", 1], "adapter": ["b", 2], "mm_prompt": ["p", 0],
                                                          "width": 64, "height": 64}},
        "c": {"class_type": "MMIGTest_ConditioningInfo", "inputs": {"conditioning": ["e", 0]}},
        "b0": {"class_type": "MMIG_MUMULoader", "inputs": {"bundle_name": name, "model": ["1", 0], "vlm": ["v", 0],
                                                           "unet_strength": 1.0, "vlm_strength": 0.0, "dtype": "auto"}},
        "e0": {"class_type": "MMIG_MUMUEncode", "inputs": {"vlm": ["b0", 1], "adapter": ["b0", 2],
                                                           "mm_prompt": ["p", 0], "width": 64, "height": 64}},
        "c0": {"class_type": "MMIGTest_ConditioningInfo", "inputs": {"conditioning": ["e0", 0]}},
        "w": {"class_type": "MMIGTest_WeightValues", "inputs": {"model": ["b", 0], "keys": key}},
        "l": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "k": {"class_type": "KSampler", "inputs": {"model": ["b", 0], "positive": ["e", 0], "negative": ["e", 0],
                                                   "latent_image": ["l", 0], "seed": 1, "steps": 2, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "d": {"class_type": "VAEDecode", "inputs": {"samples": ["k", 0], "vae": ["1", 2]}},
        "s": {"class_type": "PreviewImage", "inputs": {"images": ["d", 0]}},
    }
    result = host.run_graph(graph).check()
    report = result.outputs["b"]["text"][0]
    assert report.count("(100.0 %)") == 2 and "Warning" not in report, report  # UNet and VLM LoRA, all modules

    layer = trained.module.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    expected = (unet_weights(tiny_models / TINY_SDXL)["input_blocks.4.1.transformer_blocks.0.attn2.to_k"]
                + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]).detach())
    merged = torch.tensor(result.outputs["w"]["weights"][0][key]["values"]).view(expected.shape)
    assert (merged - expected).abs().max() < 1e-5

    colour = torch.tensor([0x33, 0x66, 0xCC]) / 255.0
    image = colour.view(1, 1, 1, 3).expand(1, 24, 32, 3)
    with torch.no_grad():
        context, _pooled = trained.module.conditioning([build_prompt("a <image1> person next to a dog", {1: image})])
    info = result.outputs["c"]["conditioning"][0]
    assert info["shape"] == list(context.shape)
    error = abs(info["means"][0] - float(context.mean()))
    without_vlm_lora = abs(result.outputs["c0"]["conditioning"][0]["means"][0] - float(context.mean()))
    assert error < 1e-6 and without_vlm_lora > 100 * error, (error, without_vlm_lora)  # the trained VLM LoRA counts
    assert result.outputs["s"]["images"]
