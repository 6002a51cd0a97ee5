"""mmig_core/p2p.py: Direct Inversion + prompt-to-prompt on a toy attention UNet, and the word alignment on
real CLIP tokens (the host's SD1.x tokenizer files)."""
from __future__ import annotations

import pytest
import torch

from devtools.paths import host_dir
from mmig_core import p2p

STEPS = 10
K, D = 12, 16          # context tokens, context width
LATENT = (1, 4, 16, 16)


class ToyUNet(torch.nn.Module):
    """Self-attention at 16x16 and 8x8, cross-attention at 8x8 and 4x4 (a quarter of the side), a
    timestep embedding: enough for every controller to have a layer to act on (and one to leave alone)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c = 8
        self.inp = torch.nn.Conv2d(4, self.c, 3, padding=1)
        self.out = torch.nn.Conv2d(self.c, 4, 3, padding=1)
        self.time = torch.nn.Linear(1, self.c)
        self.proj = torch.nn.ModuleDict({name: torch.nn.Linear(self.c if kind == "self" else D, self.c * 2)
                                         for name, kind in self.layers()})
        self.q = torch.nn.ModuleDict({name: torch.nn.Linear(self.c, self.c) for name, _ in self.layers()})
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        self.controller: p2p.P2PController | None = None
        self.calls: list[tuple[str, int]] = []

    @staticmethod
    def layers():
        return [("self16", "self"), ("self8", "self"), ("cross8", "cross"), ("cross4", "cross")]

    def attend(self, name, h, context):
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        q = self.q[name](tokens)
        source = tokens if context is None else context
        k, v = self.proj[name](source).chunk(2, dim=-1)
        self.calls.append((name, tokens.shape[1]))
        ctl = self.controller
        if ctl is None:
            out = p2p.plain_attention(q, k, v, 2)
        elif context is None:
            out = ctl.self_attention(q, k, v, 2, layer=name)
        else:
            out = ctl.cross_attention(q, k, v, 2, hw=(hh, ww), layer=name)
        return h + out.transpose(1, 2).reshape(b, c, hh, ww)

    def forward(self, z, sigma, context):
        h = self.inp(z) + self.time(torch.full((z.shape[0], 1), float(sigma) / 10))[:, :, None, None]
        h = self.attend("self16", h, None)
        h8 = F_pool(h)
        h8 = self.attend("self8", h8, None)
        h8 = self.attend("cross8", h8, context)
        h4 = F_pool(h8)
        h4 = self.attend("cross4", h4, context)
        h = h + torch.nn.functional.interpolate(h8 + torch.nn.functional.interpolate(h4, scale_factor=2),
                                                scale_factor=2)
        return self.out(torch.tanh(h))


def F_pool(h):
    return torch.nn.functional.avg_pool2d(h, 2)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    unet = ToyUNet().eval()
    g = torch.Generator().manual_seed(1)
    contexts = {name: torch.randn(1, K, D, generator=g) for name in ("uncond", "source", "target")}
    z0 = torch.randn(LATENT, generator=g)
    # SD's scaled-linear schedule as a host's model_sampling.sigmas
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - alphas) / alphas) ** 0.5
    schedule = p2p.Schedule.from_sigmas(sigmas.tolist(), STEPS)
    return unet, contexts, z0, schedule


def eps_single(unet, context):
    def eps(z, sigma):
        with torch.no_grad():
            return unet(z, sigma, context)
    return eps


def eps_batch(unet, contexts, target_offset, target_name="target"):
    names = {"uncond_source": "uncond", "uncond_target": "uncond", "cond_source": "source",
             "cond_target": target_name}
    context = torch.cat([contexts[names[row]] for row in p2p.batch_layout(target_offset)])

    def eps(z, sigma):
        with torch.no_grad():
            return unet(z, sigma, context)
    return eps


def run_edit(setup, *, target="target", target_offset=False, blend=None, **settings):
    unet, contexts, z0, schedule = setup
    unet.controller = None
    trajectory = p2p.invert(z0, schedule, eps_single(unet, contexts["source"]))
    cfg = settings.pop("cfg", p2p.GUIDANCE_SCALE)
    s = p2p.ControllerSettings(steps=STEPS, replace_mapper=torch.eye(K), self_max_tokens=64, blend=blend,
                               blend_tokens=16, **settings)
    layout = p2p.batch_layout(target_offset)
    ctl = p2p.P2PController(s, (layout.index("cond_source"), layout.index("cond_target")))
    unet.controller = ctl
    try:
        result = p2p.edit(trajectory, schedule, eps_batch(unet, contexts, target_offset, target), ctl, cfg,
                          target_offset=target_offset)
    finally:
        unet.controller = None
    return result, ctl, trajectory


def test_ddim_timesteps_are_diffusers_leading_spacing():
    assert p2p.ddim_timesteps(50)[:3] == [980, 960, 940] and p2p.ddim_timesteps(50)[-1] == 0
    assert len(p2p.ddim_timesteps(50)) == 50
    with pytest.raises(p2p.EditError, match="between 1 and 1000"):
        p2p.ddim_timesteps(0)


def test_inversion_starts_with_the_identity_step_and_ends_noisier(setup):
    unet, contexts, z0, schedule = setup
    calls = []

    def eps(z, sigma):
        calls.append(sigma)
        return eps_single(unet, contexts["source"])(z, sigma)

    trajectory = p2p.invert(z0, schedule, eps)
    assert len(trajectory) == STEPS + 1
    assert torch.equal(trajectory[1], trajectory[0])   # 0 -> 0 under set_alpha_to_one=False
    assert len(calls) == STEPS - 1 and calls[0] == schedule.sigmas[-2]  # asked at the step's target level
    assert trajectory[-1].std() > trajectory[0].std() * 1.5


def test_ddim_move_is_invertible_for_a_fixed_noise_estimate():
    z, e = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    back = p2p.ddim_move(p2p.ddim_move(z, e, 0.1, 3.0), e, 3.0, 0.1)
    assert torch.allclose(back, z, atol=1e-5)


def test_source_branch_reconstructs_the_input(setup):
    result, _, trajectory = run_edit(setup, mode="replace")
    assert (result.source - setup[2]).abs().max() <= 1e-4
    assert not torch.allclose(result.edited, result.source, atol=1e-2)   # the target did change


def test_target_equal_to_source_reproduces_the_input_with_the_target_offset(setup):
    result, _, _ = run_edit(setup, target="source", target_offset=True, mode="replace")
    assert (result.edited - setup[2]).abs().max() <= 1e-4
    assert len(result.offsets_norm) == result.model_calls and max(result.offsets_norm) > 1e-3


def test_target_equal_to_source_without_the_offset_is_plain_cfg_from_z_T(setup):
    """PnPInversion's method adds the offsets to the source branch only: its target branch is CFG sampling from
    z*_T, which does not land on the input (the reason the pack offers target_offset)."""
    result, _, _ = run_edit(setup, target="source", target_offset=False, mode="replace")
    assert (result.edited - setup[2]).abs().max() > 1e-2


def test_controllers_fire_on_the_intended_layers_and_steps(setup):
    result, ctl, _ = run_edit(setup, mode="replace", cross_replace_steps=0.4, self_replace_steps=0.6)
    # self: steps < int(0.6 * 10) = 6, only the 8x8 layer (64 tokens <= self_max_tokens; 16x16 is 256)
    assert ctl.fired("self") == {step: 1 for step in range(6)}
    assert all(ctl.layers_seen[("self", s)] == {"self8"} for s in range(6))
    # cross: steps < int(0.4 * (10 + 1)) = 4, every cross-attention layer
    assert ctl.fired("cross") == {step: 2 for step in range(4)}
    assert all(ctl.layers_seen[("cross", s)] == {"cross8", "cross4"} for s in range(4))
    assert ctl.fired("blend_maps") == {}
    # the last step (timestep 0 -> the final level) is the identity: no model call without LocalBlend
    assert result.model_calls == STEPS - 1


def test_self_copy_stops_at_self_replace_steps(setup):
    _, ctl, _ = run_edit(setup, mode="replace", cross_replace_steps=0.0, self_replace_steps=0.3)
    assert sorted(ctl.fired("self")) == [0, 1, 2] and ctl.fired("cross") == {}


def test_local_blend_keeps_the_source_outside_the_mask_exactly(setup):
    words = torch.zeros(K)
    words[3] = 1.0
    blend = p2p.Blend(source_words=words, target_words=words, threshold=0.9)  # the toy maps are flat
    result, ctl, trajectory = run_edit(setup, mode="replace", blend=blend)
    mask = result.mask
    assert mask is not None and 0 < float(mask.mean()) < 1
    outside = (mask == 0).expand_as(result.edited)
    assert torch.equal(result.edited[outside], result.source[outside])
    assert not torch.allclose(result.edited[~outside], result.source[~outside])
    # maps read at the quarter-side layer on every step (the last, identity step too), blending from int(0.2*10)
    assert ctl.fired("blend_maps") == {step: 1 for step in range(STEPS)}
    assert result.model_calls == STEPS


def test_refine_and_reweight_mix_the_source_columns():
    base = torch.softmax(torch.randn(2, 5, K), -1)
    own = torch.softmax(torch.randn(2, 5, K), -1)
    mapper, alphas = torch.arange(K), torch.ones(K)
    mapper[2], alphas[2] = 1, 0.0
    eq = torch.ones(K)
    eq[4] = 2.0
    s = p2p.ControllerSettings(steps=STEPS, refine_mapper=mapper, refine_alphas=alphas, equalizer=eq)
    out = p2p.P2PController(s, (0, 1))._replace_cross(base, own)
    assert torch.allclose(out[..., 2], own[..., 2])                  # a new token keeps its own attention
    assert torch.allclose(out[..., 3], base[..., 3])                 # an aligned one takes the source's
    assert torch.allclose(out[..., 4], 2 * base[..., 4])             # reweighted


def test_bad_settings_are_named():
    with pytest.raises(p2p.EditError, match="mode must be one of"):
        p2p.ControllerSettings(steps=5, mode="swap", replace_mapper=torch.eye(K))
    with pytest.raises(p2p.EditError, match="cross_replace_steps"):
        p2p.ControllerSettings(steps=5, cross_replace_steps=1.5, replace_mapper=torch.eye(K))


# -- words, on the real CLIP tokenizer ----------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_tokenizer():
    folder = host_dir() / "comfy" / "sd1_tokenizer"
    if not folder.is_dir():
        pytest.skip("the host's CLIP tokenizer files are not installed")
    from transformers import CLIPTokenizer
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def ids(tok, text):
    return tok(text)["input_ids"]


def decode(tok):
    return lambda t: tok.decode([t])


def test_replace_needs_equal_token_counts(clip_tokenizer):
    tok = clip_tokenizer
    a, b = ids(tok, "a photo of a cat"), ids(tok, "a photo of a dog")
    assert torch.equal(p2p.replacement_mapper(a, b, 77), torch.eye(77))
    with pytest.raises(p2p.EditError, match="Use mode refine") as info:
        p2p.replacement_mapper(a, ids(tok, "a photo of a fluffy dog"), 77, decode(tok))
    assert "'fluffy'" in str(info.value) and "source has 7" in str(info.value)


def test_refine_alignment_on_known_prompts(clip_tokenizer):
    tok = clip_tokenizer
    src, tgt = ids(tok, "a cat sitting on a mat"), ids(tok, "a fluffy cat sitting on a red mat")
    mapper, alphas = p2p.refinement_mapper(src, tgt, 77)
    # start, a, [fluffy], cat, sitting, on, a, [red], mat, end
    assert mapper[:10].tolist() == [0, 1, 2, 2, 3, 4, 5, 7, 6, 7]
    assert alphas[:10].tolist() == [1, 1, 0, 1, 1, 1, 1, 0, 1, 1]
    assert mapper[10:].tolist() == list(range(10, 77)) and bool(alphas[10:].eq(1).all())
    # a word swapped: gap 0 < mismatch -1, so the new word is new (alpha 0) rather than mapped onto the old
    mapper, alphas = p2p.refinement_mapper(ids(tok, "a cat"), ids(tok, "a dog"), 77)
    assert alphas[:4].tolist() == [1, 1, 0, 1] and mapper[3] == 3


def test_word_positions_and_missing_words(clip_tokenizer):
    tok = clip_tokenizer
    prompt = ids(tok, "a photo of a hedgehog")
    word = ids(tok, "hedgehog")[1:-1]
    assert p2p.word_positions(prompt, word) == list(range(5, 5 + len(word)))
    mask = p2p.token_mask(prompt, [("hedgehog", word)], 77)
    assert mask.nonzero().flatten().tolist() == list(range(5, 5 + len(word)))
    with pytest.raises(p2p.EditError, match="'zebra' is not in the source or target prompt") as info:
        p2p.resolve_words([("zebra", ids(tok, "zebra")[1:-1])], {"source": prompt, "target": prompt}, "blend",
                          decode(tok))
    assert "'photo'" in str(info.value)
