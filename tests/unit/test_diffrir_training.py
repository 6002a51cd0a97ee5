"""The headless DiffRIR recipe: a few CPU steps on the tiny config, loss falls, the file loads."""
import torch

from mmig_core.diffrir import load_diffrir, restore_images, tiny_config
from training.diffrir import TrainSettings, load_image_folder, train


def write_training_images(folder, count=3, size=48):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        coarse = torch.rand(1, 3, 3, 3, generator=g)
        image = torch.nn.functional.interpolate(coarse, size=(size, size + 8 * i), mode="bilinear")[0]
        data = (image.permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(data).save(folder / f"gt{i}.png")


def test_a_few_steps_lower_the_loss_and_write_a_loadable_file(tmp_path):
    write_training_images(tmp_path / "images")
    images = load_image_folder(tmp_path / "images")
    assert len(images) == 3 and images[0].shape == (3, 48, 48)
    settings = TrainSettings(model=tiny_config(), crop=32, batch=2, stage1_steps=10, stage2_steps=3, lr=2e-3)
    out = tmp_path / "models" / "diffrir" / "trained.safetensors"
    model, losses = train(images, settings, out)
    assert len(losses["stage1"]) == 10 and len(losses["stage2"]) == 3
    first, last = sum(losses["stage1"][:3]) / 3, sum(losses["stage1"][-3:]) / 3
    assert last < first, losses["stage1"]
    assert all(torch.isfinite(torch.tensor(losses["stage2"])))
    assert out.is_file() and not list(out.parent.glob("*.partial"))  # written atomically

    loaded = load_diffrir(out)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    restored = restore_images(loaded, torch.rand(1, 32, 32, 3), torch.rand(1, 32, 32, 3), torch.ones(1, 32, 32))
    assert restored.shape == (1, 32, 32, 3)
