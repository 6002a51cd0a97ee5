"""A-STAR's losses (Eqs. 19-20) and attention aggregation on small maps worked out by hand."""
import math

import pytest
import torch

from mmig_core import astar
from mmig_core.astar import ConceptError, capture_blocks, resolve_concepts


def maps(*grids):
    """[1, C, h, w] from C nested lists."""
    return torch.tensor([grids], dtype=torch.float32)


def test_disjoint_maps_have_no_segregation_loss():
    a = [[1.0, 0.0], [0.0, 0.0]]
    b = [[0.0, 0.0], [0.0, 0.7]]
    assert astar.segregation_loss(maps(a, b)).tolist() == [0.0]


def test_identical_maps_give_the_maximum_per_pair():
    a = [[0.2, 1.0], [0.5, 0.0]]
    assert astar.segregation_loss(maps(a, a)).item() == pytest.approx(1.0)
    assert astar.segregation_loss(maps(a, a, a)).item() == pytest.approx(3.0)  # three pairs


def test_partial_overlap_matches_the_hand_value():
    a = [[1.0, 0.0], [0.5, 0.0]]
    b = [[0.5, 0.5], [0.0, 0.0]]
    # sum min = 0.5, sum (a + b) = 2.5: 2 * 0.5 / 2.5
    assert astar.segregation_loss(maps(a, b)).item() == pytest.approx(0.4)
    c = [[0.0, 0.5], [0.5, 1.0]]
    # pairs (b, a) = 0.4; (c, a): sum min 0.5, sum 3.5; (c, b): sum min 0.5, sum 3.0
    expected = 0.4 + 2 * 0.5 / 3.5 + 2 * 0.5 / 3.0
    assert astar.segregation_loss(maps(a, b, c)).item() == pytest.approx(expected)


def test_a_retained_concept_has_no_retention_loss():
    a = [[1.0, 0.0], [1.0, 0.0]]
    current = maps(a, [[0.0, 1.0], [0.0, 0.0]])
    previous = astar.binarise(current)
    assert astar.retention_loss(current, previous).tolist() == [0.0]


def test_retention_loss_hand_values():
    previous = maps([[1.0, 1.0], [0.0, 0.0]])
    lost = maps([[0.0, 0.0], [0.3, 1.0]])
    assert astar.retention_loss(lost, previous).item() == pytest.approx(1.0)
    half = maps([[1.0, 0.0], [0.0, 0.0]])
    # sum min = 1, sum (A + B) = 3: 1 - 2/3
    assert astar.retention_loss(half, previous).item() == pytest.approx(1 / 3)


def test_binarise_thresholds_against_the_maximum_and_detaches():
    m = maps([[0.2, 0.8], [0.39, 0.41]]).requires_grad_(True)
    assert astar.binarise(m).tolist() == [[[[0.0, 1.0], [0.0, 1.0]]]]
    assert not astar.binarise(m).requires_grad


def test_gaussian_kernel_and_smoothing_on_known_inputs():
    w = math.exp(-((1 / (2 * 0.5)) ** 2))  # Attend-and-Excite's kernel exp(-((x - mu) / (2 sigma))^2)
    g = torch.tensor([w, 1.0, w]) / (1 + 2 * w)
    assert torch.allclose(astar.gaussian_kernel(3, 0.5), g[:, None] * g[None, :])
    delta = torch.zeros(1, 1, 5, 5)
    delta[0, 0, 2, 2] = 1.0
    smoothed = astar.gaussian_smooth(delta, 3, 0.5)
    assert torch.allclose(smoothed[0, 0, 1:4, 1:4], g[:, None] * g[None, :])
    assert smoothed.sum().item() == pytest.approx(1.0)
    flat = torch.full((1, 2, 4, 3), 0.25)
    assert torch.allclose(astar.gaussian_smooth(flat), flat)  # reflect padding keeps the borders' mass


def test_text_softmax_drops_the_start_token_and_averages_heads():
    # [B=1, heads=2, N=1 query, 4 keys]: start token, two words, end token.
    probs = torch.tensor([[[[0.70, 0.10, 0.15, 0.05]], [[0.60, 0.20, 0.10, 0.10]]]])
    out = astar.text_token_maps(probs, [1, 2])
    head0 = torch.softmax(torch.tensor([10.0, 15.0]), 0)
    head1 = torch.softmax(torch.tensor([20.0, 10.0]), 0)
    assert torch.allclose(out[0, 0], (head0 + head1) / 2)
    assert out.shape == (1, 1, 2)


def test_concept_maps_average_layers_and_pick_columns():
    layer_a = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.0, 1.0]]])  # [B, N=4, W=2]
    layer_b = torch.tensor([[[0.7, 0.3], [0.4, 0.6], [0.5, 0.5], [0.2, 0.8]]])
    out = astar.concept_maps([layer_a, layer_b], (2, 2), [[0], [1]], smoothing=(1, 0.0))
    assert torch.allclose(out[0, 0], torch.tensor([[0.8, 0.3], [0.5, 0.1]]))
    assert torch.allclose(out[0, 1], torch.tensor([[0.2, 0.7], [0.5, 0.9]]))


def test_attend_excite_maps_average_layers_and_heads_then_softmax_over_1_to_minus_1():
    # Two layers of [B=1, N=4 queries, Nk=5 keys] summed over 2 and 1 heads: 3 heads in all.
    gen = torch.Generator().manual_seed(0)
    layer_a = torch.rand(1, 4, 5, generator=gen) * 2
    layer_b = torch.rand(1, 4, 5, generator=gen)
    out = astar.attend_excite_maps([layer_a, layer_b], 3, (2, 2), [2, 3], smoothing=(1, 0.0))
    mean = (layer_a + layer_b) / 3
    text = torch.softmax(100 * mean[..., 1:4], dim=-1)  # keys 1..3: the end/padding key 3 included
    assert out.shape == (1, 2, 2, 2)
    assert torch.allclose(out[0, 0].flatten(), text[0, :, 1]) and torch.allclose(out[0, 1].flatten(), text[0, :, 2])
    # the softmax after the average differs from an average of per-layer softmaxes
    per_layer = (torch.softmax(100 * layer_a[..., 1:4] / 2, -1) + torch.softmax(100 * layer_b[..., 1:4], -1)) / 2
    assert not torch.allclose(text, per_layer, atol=1e-3)


def test_attend_excite_loss_is_the_worst_tokens_missing_maximum():
    maps = torch.zeros(2, 2, 2, 2)
    maps[0, 0, 0, 0], maps[0, 1, 1, 1] = 0.9, 0.3
    maps[1, 0, 0, 1], maps[1, 1, 0, 0] = 1.2, 1.0
    assert astar.attend_excite_loss(maps).tolist() == pytest.approx([0.7, 0.0])


def test_attend_excite_step_size_is_indexed_by_sampler_step():
    schedule = [20 * math.sqrt(x) for x in torch.linspace(1, 0.5, 4).tolist()]
    assert [astar.attend_excite_step_size(20, i, 4) for i in range(4)] == pytest.approx(schedule)
    assert astar.attend_excite_step_size(20, 0, 1) == 20


def test_explicit_probabilities_match_the_fused_kernel():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    probs = astar.attention_probabilities(q, k, heads=4)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 6))
    fused = torch.nn.functional.scaled_dot_product_attention(
        *(t.reshape(2, t.shape[1], 4, 4).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(2, 6, 16)
    assert torch.allclose(astar.attention_output(probs, v), fused, atol=1e-5)


def test_step_size_follows_attend_and_excite():
    schedule = [20 * math.sqrt(x) for x in torch.linspace(1, 0.5, 50).tolist()]
    assert [astar.step_size(20, i / 49) for i in (0, 10, 49)] == pytest.approx([schedule[0], schedule[10], schedule[49]])


def test_update_never_writes_nan():
    z = torch.ones(1, 4, 2, 2)
    grad = torch.full_like(z, 0.5)
    assert torch.equal(astar.safe_update(z, grad, 2.0)[0], torch.zeros_like(z))
    grad[0, 0, 0, 0] = float("nan")
    assert astar.safe_update(z, grad, 2.0) == (z, False)
    assert astar.safe_update(z, torch.ones_like(z), float("inf"))[1] is False


def test_weights_made_under_inference_mode_become_differentiable():
    with torch.inference_mode():
        net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        net(x).sum().backward()
    assert astar.make_weights_differentiable(net) == 4
    before = net[0].weight.clone()
    net(x).sum().backward()
    assert x.grad is not None and torch.equal(net[0].weight, before) and not net[0].weight.requires_grad


START, END = 49406, 49407


def test_concepts_resolve_to_token_positions():
    # "a cat and a big dog": 'big dog' as a two-token concept
    chunk = [START, 320, 2368, 537, 320, 1205, 1929, END, END]
    positions, words = resolve_concepts([chunk], {"cat": [2368], "big dog": [1205, 1929]}, START, END)
    assert positions == [[2], [5, 6]] and words == [1, 2, 3, 4, 5, 6]


def test_a_concept_not_in_the_prompt_lists_the_prompt_tokens():
    names = {320: "a</w>", 2368: "cat</w>"}
    with pytest.raises(ConceptError) as err:
        resolve_concepts([[START, 320, 2368, END]], {"horse": [4558]}, START, END,
                         lambda t: names.get(t, str(t)).replace("</w>", ""))
    assert "'horse'" in str(err.value) and "1:a, 2:cat" in str(err.value)


class Downsample(torch.nn.Module):
    pass


class Upsample(torch.nn.Module):
    pass


class CrossAttentionBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn2 = torch.nn.Identity()


def _unet(levels_with_attention, n_levels, per_level=2):
    """An SD-shaped block layout: input blocks with downsamples between levels, a middle, output blocks."""
    unet = torch.nn.Module()
    inputs = [torch.nn.Sequential(torch.nn.Identity())]
    for level in range(n_levels):
        for _ in range(per_level):
            inputs.append(torch.nn.Sequential(CrossAttentionBlock()) if level in levels_with_attention
                          else torch.nn.Sequential(torch.nn.Identity()))
        if level < n_levels - 1:
            inputs.append(torch.nn.Sequential(Downsample()))
    unet.input_blocks = torch.nn.ModuleList(inputs)
    unet.middle_block = torch.nn.Sequential(CrossAttentionBlock())
    outputs = []
    for level in reversed(range(n_levels)):
        for i in range(per_level + 1):
            parts = [CrossAttentionBlock()] if level in levels_with_attention else [torch.nn.Identity()]
            if i == per_level and level > 0:
                parts.append(Upsample())
            outputs.append(torch.nn.Sequential(*parts))
    unet.output_blocks = torch.nn.ModuleList(outputs)
    return unet


def test_capture_layers_are_a_quarter_of_the_latent_side():
    sd1 = _unet({0, 1, 2}, 4)       # 64, 32, 16, 8 at 512 px: 16x16 is level 2
    assert capture_blocks(sd1) == [("input", 7), ("input", 8), ("output", 3), ("output", 4), ("output", 5)]
    sdxl = _unet({1, 2}, 3)         # 128, 64, 32 at 1024 px: 32x32 is level 2, the middle block too
    assert capture_blocks(sdxl) == [("input", 7), ("input", 8), ("middle", 0),
                                    ("output", 0), ("output", 1), ("output", 2)]
