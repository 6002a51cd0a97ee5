"""LayerDiffusion's layered embeddings (Eqs. 15-18): the blend, the mask handling, the optimisation loop."""
import pytest
import torch

from mmig_core import layered_embeddings as layered


def test_the_blend_is_exact():
    e_a = torch.tensor([[[1.0, 2.0], [3.0, -4.0]]])
    e_b = torch.tensor([[[0.5, 0.0], [-1.0, 8.0]]])
    assert torch.equal(layered.blend(e_a, e_b, 0.7), 0.7 * e_a + (1 - 0.7) * e_b)
    assert torch.equal(layered.blend(e_a, e_b, 1.0), e_a) and torch.equal(layered.blend(e_a, e_b, 0.0), e_b)
    assert torch.allclose(layered.blend(e_a, e_b), torch.tensor([[[0.85, 1.4], [1.8, -0.4]]]))  # alpha = 0.7
    with pytest.raises(layered.LayeredInputError, match="same number of 75-token chunks"):
        layered.blend(e_a, torch.zeros(1, 4, 2))


def test_masked_loss_hand_value():
    noise = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]])
    predicted = torch.tensor([[[[0.0, 0.0], [5.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 0.5], [0.0, 1.0]]]])
    assert layered.masked_noise_loss(noise, predicted, mask).item() == pytest.approx((1 + 1 + 0 + 0) / 4)


def test_mask_is_resized_to_the_latent():
    mask = torch.zeros(1, 64, 32)
    mask[:, :32] = 1.0  # the top half
    out = layered.latent_mask(mask, (2, 4, 8, 4))
    assert out.shape == (2, 1, 8, 4)
    assert out[:, :, :4].min() == 1.0 and out[:, :, 4:].max() == 0.0


def test_mask_size_or_batch_mismatch_is_a_clear_error():
    with pytest.raises(layered.LayeredInputError, match="64x32 px but the latent is 8x8"):
        layered.latent_mask(torch.ones(1, 32, 64), (1, 4, 8, 8))
    with pytest.raises(layered.LayeredInputError, match="batch of 3 but the latent has 2"):
        layered.latent_mask(torch.ones(3, 64, 64), (2, 4, 8, 8))


class ToyDenoiser(torch.nn.Module):
    """eps = conv(x_t) + a projection of the mean context token: small, but the context matters."""
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(8, 4)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.2
        self.calls = 0

    def forward(self, x_t, sigma, context):
        self.calls += 1
        scaled = x_t / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()
        return self.conv(scaled) + self.proj(context.mean(dim=1))[:, :, None, None]


def test_optimisation_lowers_the_masked_loss_and_keeps_shapes():
    model = ToyDenoiser().requires_grad_(False)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    e_a, e_b = torch.zeros(1, 5, 8), torch.ones(1, 5, 8)
    steps_seen = []
    result = layered.optimise_layered_embeddings(model, latent, mask, e_a, e_b, torch.linspace(0.1, 10, 50),
                                                 steps=30, learning_rate=0.05, seed=0,
                                                 on_step=steps_seen.append)
    assert steps_seen == list(range(30)) and len(result.losses) == 30
    assert result.probe_after < 0.95 * result.probe_before
    assert result.e_a.shape == e_a.shape and not torch.equal(result.e_a, e_a)
    assert torch.equal(result.e_opt, 0.7 * result.e_a + 0.3 * result.e_b)
    assert torch.equal(e_a, torch.zeros(1, 5, 8))  # the inputs are not changed


def test_recombination_adds_foreground_and_background_terms():
    model = ToyDenoiser().requires_grad_(False)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 1, 8, 8)
    args = dict(steps=1, learning_rate=0.0, seed=0, probes=0)
    plain = layered.optimise_layered_embeddings(model, latent, mask, torch.zeros(1, 5, 8), torch.ones(1, 5, 8),
                                                torch.tensor([1.0]), **args)
    calls = model.calls
    reference = (torch.randn(1, 4, 8, 8), torch.zeros(1, 1, 8, 8))
    mixed = layered.optimise_layered_embeddings(model, latent, mask, torch.zeros(1, 5, 8), torch.ones(1, 5, 8),
                                                torch.tensor([1.0]), reference=reference, **args)
    assert model.calls - calls == 3  # Eq. 15, L_fg (Eq. 17) and L_bg (Eq. 18)
    assert mixed.losses[0] > plain.losses[0]


def test_interruption_stops_the_loop():
    class Stop(Exception):
        pass

    def interrupt():
        raise Stop

    with pytest.raises(Stop):
        layered.optimise_layered_embeddings(ToyDenoiser(), torch.zeros(1, 4, 8, 8), torch.ones(1, 1, 8, 8),
                                            torch.zeros(1, 5, 8), torch.zeros(1, 5, 8), torch.tensor([1.0]),
                                            steps=3, learning_rate=0.1, check_interrupt=interrupt)
