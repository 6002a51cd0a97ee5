"""Guidance that fits (issue 18 item 3): the pass with gradients holds only what the loss needs, the latent moves as
before; running out of memory there is a clear error and the guided model keeps working. On the tiny SDXL and SD1.x
through the host's own loader and samplers (comfy.sample.sample, what KSampler runs), in this process."""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools.pack import import_pack_module  # noqa: E402
from mmig_core import astar  # noqa: E402
from mmig_core import layered_embeddings as layered  # noqa: E402

PROMPT = "a photo of a cat and a dog"
LATENT = (1, 4, 8, 8)    # 64 px: the quarter-side capture layers are 2x2
TOLERANCE = 2e-3         # relative, on the final latent: see the equality test


def _g():
    return import_pack_module("nodes._guidance")


@pytest.fixture(scope="module")
def sdxl(load_tiny_sdxl_in_host):
    model, clip, _, _ = load_tiny_sdxl_in_host(output_clip=True)
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
        neg, neg_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    positions, words = _g().concepts_from_clip(clip, PROMPT, "cat, dog", "")
    return (model, ([[cond, {"pooled_output": pooled}]], [[neg, {"pooled_output": neg_pooled}]]), positions, words,
            LATENT)


@pytest.fixture(scope="module")
def sd15(tiny_models, load_tiny_sdxl_in_host):
    import comfy.sd

    from devtools.tiny_models import TINY_SD15
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(tiny_models / TINY_SD15), output_vae=False,
                                                      output_clip=False, embedding_directory=None)[0]
    gen = torch.Generator().manual_seed(3)
    cond, neg = torch.randn(1, 77, 768, generator=gen), torch.randn(1, 77, 768, generator=gen)
    return model, ([[cond, {}]], [[neg, {}]]), [[2], [5]], list(range(1, 8)), (1, 4, 16, 16)  # 4x4 maps


def _sample(model, conditioning, sampler="euler", steps=3, latent=LATENT):
    import comfy.sample

    positive, negative = conditioning
    empty = torch.zeros(latent)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(empty, seed=0)
        return comfy.sample.sample(model, noise, steps, 5.0, sampler, "normal", positive, negative, empty, seed=0,
                                   disable_pbar=True)


def _guided(setup, **settings):
    model, _, positions, words, _ = setup
    return _g().guided_model(model, _g().AStarSettings(positions, words, **settings))


def _block_calls(guided):
    """(block kind, index, grad enabled, batch) of every UNet block run, via forward hooks on a clone's UNet."""
    calls, handles = [], []
    unet = guided.model.diffusion_model
    for kind in ("input", "output"):
        for i, block in enumerate(getattr(unet, f"{kind}_blocks")):
            # the host's forward_timestep_embed calls each block's layers, not the block: hook its first layer
            handles.append(block[0].register_forward_hook(
                lambda _m, args, _out, kind=kind, i=i: calls.append((kind, i, torch.is_grad_enabled(),
                                                                     args[0].shape[0]))))
    return calls, handles


CASES = [  # (family, settings): each mode and path of the guided pass on one of the two architectures
    ("sdxl", dict(guided_steps=2, scale_factor=200.0)),
    ("sdxl", dict(guided_steps=2, scale_factor=200.0, reuse_prediction=True)),
    ("sdxl", dict(mode="attend_and_excite", guided_steps=2, max_refine_iters=3)),
    ("sd15", dict(guided_steps=2, refine_at_steps=(0,), max_refine_iters=3)),  # A&E's step size: 200 explodes
    ("sd15", dict(guided_steps=1, scale_factor=200.0, measure_all_steps=True)),
]


def _runs(setup, settings, **variants):
    out = {}
    for name, (lean, cond_rows_only) in variants.items():
        guided, guidance = _guided(setup, lean_graph=lean, **settings)
        guidance.cond_rows_only = cond_rows_only
        out[name] = (_sample(guided, setup[1], "euler", steps=2, latent=setup[4]), guidance.all_records()[-1])
    return out


@pytest.mark.parametrize("family, settings", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_the_lean_graph_moves_the_latent_as_the_full_one(request, family, settings):
    setup = request.getfixturevalue(family)
    runs = _runs(setup, settings, full=(False, True), stopped=(True, False), lean=(True, True))
    full, full_records = runs["full"]
    plain = _sample(setup[0], setup[1], "euler", steps=2, latent=setup[4])
    assert any(r.updated for r in full_records) and (full - plain).abs().max() > 1e-4  # guidance acted
    # Stopping at the last capture layer alone runs the very same operations up to it: bit-identical.
    stopped, stopped_records = runs["stopped"]
    assert torch.equal(stopped, full) and stopped_records == full_records
    # The cond rows alone: the same maths batched differently (float rounding ~1e-7, which A-STAR's step of 200
    # times the gradient, refined, grows to ~1e-3 by the end; A&E's own step size leaves it ~1e-6).
    lean, lean_records = runs["lean"]
    assert torch.isfinite(lean).all()
    assert [(r.updated, r.refine_iters) for r in lean_records] == [(r.updated, r.refine_iters) for r in full_records]
    assert lean_records[0].segregation == pytest.approx(full_records[0].segregation, rel=1e-5, abs=1e-6)
    assert float((lean - full).abs().max() / full.abs().max()) < TOLERANCE


def test_the_lean_pass_runs_the_cond_rows_and_stops_at_the_last_capture_layer(sdxl):
    guided, guidance = _guided(sdxl, guided_steps=1, scale_factor=200.0)
    unet = guided.model.diffusion_model
    blocks = astar.capture_blocks(unet)
    last_output = max(i for kind, i in blocks if kind == "output")
    assert guidance.capture_layers == astar.capture_layer_count(unet, blocks) > len(blocks) - 1
    calls, handles = _block_calls(guided)
    try:
        _sample(guided, sdxl[1], "euler", steps=1)
    finally:
        for h in handles:
            h.remove()
    with_grad = [c for c in calls if c[2]]
    assert with_grad and all(batch == 1 for *_, batch in with_grad)  # the cond row alone (the CFG batch is 2)
    assert {i for kind, i, *_ in with_grad if kind == "output"} == set(range(last_output + 1))
    assert len(unet.output_blocks) > last_output + 1  # there are blocks after it, and ...
    after = [c for c in calls if c[0] == "output" and c[1] > last_output]
    assert after and not any(c[2] for c in after)  # ... they ran only in the fresh, gradient-free prediction
    assert len([c for c in calls if c[:2] == ("output", last_output + 1)]) == 1


def test_without_the_lean_graph_the_whole_batch_runs_to_the_end_with_gradients(sdxl):
    guided, _ = _guided(sdxl, guided_steps=1, scale_factor=200.0, lean_graph=False)
    calls, handles = _block_calls(guided)
    try:
        _sample(guided, sdxl[1], "euler", steps=1)
    finally:
        for h in handles:
            h.remove()
    last = len(guided.model.diffusion_model.output_blocks) - 1
    assert ("output", last, True, 2) in calls


@pytest.mark.parametrize("chained", [False, True])
def test_where_the_pass_prediction_is_needed_the_rest_runs_without_gradients(sdxl, chained):
    model = sdxl[0]
    if chained:  # another node's UNet wrapper in between: the pass is never stopped by an exception through it
        model = model.clone()
        model.set_model_unet_function_wrapper(lambda apply_model, args: apply_model(args["input"], args["timestep"],
                                                                                      **args["c"]))
    settings = dict(guided_steps=1, scale_factor=200.0, reuse_prediction=True)
    guided, guidance = _g().guided_model(model, _g().AStarSettings(sdxl[2], sdxl[3], **settings))
    assert guidance.may_stop_early is not chained
    calls, handles = _block_calls(guided)
    try:
        _sample(guided, sdxl[1], "euler", steps=1)
    finally:
        for h in handles:
            h.remove()
    unet = guided.model.diffusion_model
    last_output = max(i for kind, i in astar.capture_blocks(unet) if kind == "output")
    after = [c for c in calls if c[0] == "output" and c[1] > last_output]
    assert after and not any(grad for _, _, grad, _ in after)
    assert [r.updated for r in guidance.all_records()[-1]] == [True]


def _saved_bytes(guided, conditioning):
    """Bytes autograd saves for backward over a one-step guided sampling run (the graph's size)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _sample(guided, conditioning, "euler", steps=1, latent=(1, 4, 32, 32))
    return total[0]


def test_the_lean_graph_saves_less_than_half_of_the_full_one(sdxl):
    full = _saved_bytes(_guided(sdxl, guided_steps=1, scale_factor=200.0, lean_graph=False)[0], sdxl[1])
    lean = _saved_bytes(_guided(sdxl, guided_steps=1, scale_factor=200.0)[0], sdxl[1])
    print(f"tiny SDXL, 256 px: autograd saved {full / 2 ** 20:.1f} MiB (full graph) vs {lean / 2 ** 20:.1f} MiB (lean)")
    assert 0 < lean < 0.5 * full  # the cond row alone halves it; stopping at the last capture layer cuts more


def test_a_patch_that_cannot_take_the_cond_rows_alone_falls_back_to_the_whole_batch(sdxl):
    class WholeBatchOnly:
        def __deepcopy__(self, memo):
            return self

        def __call__(self, h, hsp, transformer_options):
            if h.shape[0] != 2:
                raise RuntimeError(f"this patch wants the batch of 2, got {h.shape[0]}")
            return h, hsp

    model = sdxl[0].clone()
    model.set_model_output_block_patch(WholeBatchOnly())
    guided, guidance = _g().guided_model(model, _g().AStarSettings(sdxl[2], sdxl[3], guided_steps=2,
                                                                   scale_factor=200.0))
    result = _sample(guided, sdxl[1], "euler")
    assert torch.isfinite(result).all() and [r.updated for r in guidance.all_records()[-1]] == [True, True]
    assert len(guidance.warnings) == 1 and "cond rows alone failed" in guidance.warnings[0]


# -- not enough memory ---------------------------------------------------------------------------------

class _RunsOutOfMemory:
    """A UNet wrapper (set before the guidance's, so the guided pass runs through it) that fails the first pass
    with gradients as an allocator does."""

    def __init__(self, error):
        self.error, self.raised = error, 0

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: keep one counter
        return self

    def __call__(self, apply_model, args):
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and not self.raised:
            self.raised += 1
            raise self.error
        return apply_model(args["input"], args["timestep"], **args["c"])


@pytest.mark.parametrize("error, needed", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.25 GiB. GPU 0 has a total capacity of "
                                 "8.00 GiB of which 1.10 GiB is free."), "3.25 GiB more"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: not enough memory: you tried to "
                  "allocate 5368709120 bytes."), "5.00 GiB more"),
])
def test_out_of_memory_in_the_guided_pass_is_a_clear_error_and_the_model_keeps_working(sdxl, error, needed):
    model = sdxl[0].clone()
    failing = _RunsOutOfMemory(error)
    model.set_model_unet_function_wrapper(failing)
    guided, guidance = _g().guided_model(model, _g().AStarSettings(sdxl[2], sdxl[3], guided_steps=2,
                                                                   scale_factor=200.0))
    with pytest.raises(torch.cuda.OutOfMemoryError) as caught:  # the host's OOM handling (free models) applies
        _sample(guided, sdxl[1], "euler")
    message = str(caught.value)
    assert isinstance(caught.value, _g().GuidanceOutOfMemoryError) and failing.raised == 1
    for part in (f"needed {needed}", "at step 0", "64x64 px", "smaller size", "guided_steps, now 2", "--lowvram"):
        assert part in message, (part, message)
    assert caught.value.__context__ is None and caught.value.__cause__ is None  # the failed graph is not kept
    result = _sample(guided, sdxl[1], "euler")  # the next prompt runs as usual, guided
    assert torch.isfinite(result).all() and [r.updated for r in guidance.all_records()[-1]] == [True, True]


def test_other_errors_are_not_taken_for_out_of_memory():
    g = _g()
    assert g.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB"))
    assert not g.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not g.is_out_of_memory(ValueError("out of memory"))  # only the allocators' own errors


# -- layered embeddings: only the embeddings get a gradient ----------------------------------------------

def test_layered_embeddings_give_no_weight_a_gradient_and_restore_requires_grad(load_tiny_sdxl_in_host):
    model = load_tiny_sdxl_in_host(inference_mode=False)[0]  # weights that require grad, as a training run has
    unet = model.model.diffusion_model
    unet.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    latent, mask = torch.randn(1, 4, 8, 8, generator=gen), torch.ones(1, 1, 8, 8)
    fg, bg = (torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}), \
        (torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)})
    seen = []

    def pack(t):
        seen.append(t.numel() * t.element_size())
        return t

    def optimise():
        seen.clear()
        return layered.optimise_for_model(model.model, torch.device("cpu"), latent, mask, fg, bg, steps=2,
                                          learning_rate=0.05, seed=0, probes=1)[0]

    result = optimise()
    assert all(p.requires_grad for p in unet.parameters())          # restored
    assert all(p.grad is None for p in unet.parameters())           # none was given one
    assert len(result.losses) == 2 and (result.e_a != fg[0]).any()  # the embeddings did move

    def graph_bytes(freeze):  # measured: what autograd keeps for one pass whose context needs a gradient
        seen.clear()
        frozen = astar.frozen(unet) if freeze else contextlib.nullcontext()
        with torch.inference_mode(False), torch.enable_grad(), astar.norms_on_copies(unet), frozen, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            context = torch.cat([fg[0], bg[0]], dim=1).requires_grad_(True)
            y = model.model.encode_adm(pooled_output=fg[1]["pooled_output"], width=64, height=64, target_width=64,
                                       target_height=64, device=torch.device("cpu"))
            model.model.apply_model(latent.clone(), torch.tensor([5.0]), c_crossattn=context, y=y)
        return sum(seen)

    lean, with_weights = graph_bytes(True), graph_bytes(False)
    print(f"tiny SDXL, 64 px: one pass keeps {lean / 2 ** 20:.2f} MiB frozen vs {with_weights / 2 ** 20:.2f} MiB")
    assert lean < 0.8 * with_weights and all(p.requires_grad for p in unet.parameters())
