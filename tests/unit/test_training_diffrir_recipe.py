"""Recipe `diffrir` on the engine: stage 1 lowers the loss on a fixed batch, stage 2 starts from stage 1's
export with its teacher, and the exported file loads through mmig_core.diffrir's loader and restores."""
import pytest
import torch

from mmig_core.diffrir import load_diffrir, restore_images
from test_diffrir_training import write_training_images
from training import engine
from training.config import load_config
from training.recipe import RunContext
from training.recipes import diffrir as recipe


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small CPU models on a shared 2-core machine: a second intra-op thread only adds contention (10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def fixed_batch_loss(module: recipe.DiffRIRTraining, dataset) -> float:
    """The loss on the same 4 samples (same crops, degradations, masks, noise) every time it is asked."""
    batch = recipe.collate([dataset[i % len(dataset)] for i in range(4)])
    batch["sample_seed"] = torch.arange(100, 104)
    with torch.no_grad():
        loss, _ = module(batch, 0)
    return float(loss)


def test_stage1_lowers_the_loss_and_stage2_exports_a_loadable_network(tmp_path):
    write_training_images(tmp_path / "images")
    common = [f"recipe.images={tmp_path / 'images'}", "recipe.preset=tiny", "recipe.crop=32", "recipe.lr=0.003",
              "train.batch_size=2", "train.device=cpu", "train.checkpoint_every=100"]

    stage1_config, stage1_train = load_config(recipe.RecipeConfig, None, common + [
        "train.steps=8", f"train.out_dir={tmp_path / 'stage1'}"])
    engine.seed_everything(stage1_train.seed)
    untrained = recipe.build(stage1_config, RunContext(device=torch.device("cpu")))
    assert {name for name, p in untrained.module.named_parameters() if p.requires_grad} == {
        name for name, _ in untrained.module.named_parameters()
        if name.startswith(("model.restorer.", "teacher."))}
    before = fixed_batch_loss(untrained.module, untrained.dataset)
    result = engine.run(recipe, stage1_config, stage1_train)
    stage1_file = tmp_path / "stage1" / "export" / "diffrir-stage1.safetensors"
    assert result.completed and result.exports == [stage1_file, recipe.teacher_path(stage1_file)]

    trained = recipe.build(stage1_config, RunContext(device=torch.device("cpu")))
    trained.module.model.load_state_dict(load_diffrir(stage1_file).state_dict())
    trained.module.teacher.load_state_dict(recipe.load_teacher(recipe.teacher_path(stage1_file),
                                                               trained.module.model.config).state_dict())
    after = fixed_batch_loss(trained.module, trained.dataset)
    assert after < 0.95 * before, (before, after)

    stage2_config, stage2_train = load_config(recipe.RecipeConfig, None, common + [
        "recipe.stage=2", f"recipe.stage1={stage1_file}", "recipe.name=my-diffrir", "train.steps=2",
        f"train.out_dir={tmp_path / 'stage2'}"])
    result = engine.run(recipe, stage2_config, stage2_train)
    assert result.completed and result.exports == [tmp_path / "stage2" / "export" / "my-diffrir.safetensors"]
    assert result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))

    loaded = load_diffrir(result.exports[0])
    stage1_weights = load_diffrir(stage1_file).state_dict()
    changed = [k for k, v in loaded.state_dict().items() if not torch.equal(v, stage1_weights[k])]
    assert any(k.startswith("prior_encoder.") for k in changed) and any(k.startswith("denoiser.") for k in changed)
    restored = restore_images(loaded, torch.rand(1, 32, 32, 3), torch.rand(1, 32, 32, 3), torch.ones(1, 32, 32))
    assert restored.shape == (1, 32, 32, 3) and torch.isfinite(restored).all()
