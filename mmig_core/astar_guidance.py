"""A-STAR guidance during sampling, spoken in ComfyUI's patch-function protocol (no comfy import).

Three callables go on a cloned MODEL:
- `attention_replace(q, k, v, extra_options)`: an attn2 replacement for the capture layers; during a
  guided pass it computes explicit probabilities and records each layer's word maps.
- `unet_wrapper(apply_model, args)`: on guided steps runs the sampler's own CFG forward with
  gradients, takes the maps from that pass, backpropagates L_AS + L_AR to the latent and keeps
  the update z <- z - alpha_t grad_z for the post-CFG hook. One forward + one backward per step.
- `post_cfg(args)`: applies the update to the sampler's latent (in place: the sampler then steps
  from the updated z) and shifts the denoised estimate by the same amount, i.e. the step reuses the
  noise prediction of the pass, as a scheduler step on the updated latent would.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from . import astar

log = logging.getLogger("mmig.astar")
COND = 0  # ComfyUI's marker for the conditional chunk of a batch
KEEP_RUNS = 8  # loss records of the last sampling runs kept for inspection


class ConceptError(ValueError):
    """A concept that cannot be found in the prompt."""


def resolve_concepts(prompt_chunks: list[list[int]], concepts: dict[str, list[int]], start_id: int, end_id: int,
                     describe_token=str) -> tuple[list[list[int]], list[int]]:
    """Token positions of each concept in the prompt, and the prompt's word positions.

    prompt_chunks: the prompt's token ids per chunk (start, words, end, padding). concepts: each
    concept's own token ids (no start/end). Positions index the concatenated context."""
    flat, word_positions = [], []
    for chunk in prompt_chunks:
        in_words = False
        for i, token in enumerate(chunk):
            if i == 0 and token == start_id:
                in_words = True
            elif token == end_id:
                in_words = False
            elif in_words:
                word_positions.append(len(flat))
            flat.append(token)
    positions = []
    for name, ids in concepts.items():
        found = None
        for start in word_positions:
            if ids and flat[start:start + len(ids)] == ids:
                found = list(range(start, start + len(ids)))
                break
        if found is None:
            raise ConceptError(f"The concept '{name}' is not in the prompt. The prompt's tokens are: "
                               f"{describe_tokens(flat, word_positions, describe_token)}. Use one of these "
                               f"words, or give token_indices.")
        positions.append(found)
    return positions, word_positions


def describe_tokens(flat: list[int], word_positions: list[int], describe_token=str) -> str:
    return ", ".join(f"{p}:{describe_token(flat[p])}" for p in word_positions)


@dataclass
class AStarSettings:
    concept_positions: list[list[int]]   # context positions of each concept's tokens
    word_positions: list[int]            # the prompt's word tokens: the text softmax runs over these
    guided_steps: int = astar.ATTEND_EXCITE_GUIDED_STEPS
    scale_factor: float = astar.ATTEND_EXCITE_SCALE_FACTOR
    threshold: float = astar.BINARISE_THRESHOLD
    smoothing: tuple[int, float] = astar.ATTEND_EXCITE_SMOOTHING
    refine_at_steps: tuple[int, ...] = ()
    max_refine_iters: int = 20
    measure_all_steps: bool = False      # evidence runs: log the losses after the guided steps too

    @property
    def concept_columns(self) -> list[list[int]]:
        """Each concept's columns among the word positions (the text softmax's output order)."""
        index = {p: i for i, p in enumerate(self.word_positions)}
        return [[index[p] for p in group] for group in self.concept_positions]


@dataclass
class StepRecord:
    step: int
    sigma: float
    segregation: float
    retention: float | None
    alpha: float
    updated: bool
    refine_iters: int = 0


@dataclass
class _Run:
    step: int = -1
    last_sigma: float | None = None
    previous_binary: torch.Tensor | None = None
    records: list[StepRecord] = field(default_factory=list)


class AStarGuidance:
    def __init__(self, settings: AStarSettings, diffusion_model: torch.nn.Module, input_scale, progress):
        """input_scale(sigma [B]) -> [B, 1, 1, 1]: the host's x -> UNet-input factor (z = s * x).
        progress(sigma) -> float in [0, 1]: how far through the training schedule the noise level is."""
        self.settings = settings
        self.diffusion_model = diffusion_model
        self.input_scale = input_scale
        self.progress = progress
        self.capture_calls: dict[tuple, int] = {}  # block key -> calls during guided passes (tests count them)
        self.run = _Run()
        self.runs: list[list[StepRecord]] = []
        self._capturing = False
        self._cond_rows: torch.Tensor | None = None
        self._layer_maps: list[torch.Tensor] = []
        self._map_size: tuple[int, int] | None = None
        self._pending: tuple[float, torch.Tensor, torch.Tensor] | None = None
        self.warnings: list[str] = []
        if len(settings.concept_positions) < 2:
            self._warn("A-STAR got fewer than two concepts: the segregation term L_AS is skipped, only "
                       "the retention term L_AR guides.")

    # -- hooks ------------------------------------------------------------------------------------
    def attention_replace(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if not self._capturing:
            b = q.shape[0]
            qh, kh, vh = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
            return out.transpose(1, 2).reshape(b, q.shape[1], -1)
        block = extra_options.get("block")
        key = (block[0], block[1]) if block else ("unknown", 0)
        self.capture_calls[key] = self.capture_calls.get(key, 0) + 1
        probs = astar.attention_probabilities(q, k, heads)
        self._layer_maps.append(astar.text_token_maps(probs[self._cond_rows], self.settings.word_positions))
        self._map_size = _layer_size(extra_options.get("original_shape"), q.shape[1])
        return astar.attention_output(probs, v)

    def unet_wrapper(self, apply_model, args):
        x, sigma, c, chunks = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        if COND not in chunks:
            return apply_model(x, sigma, **c)
        step = self._track_step(sigma)
        guided = step < self.settings.guided_steps
        if not guided and not self.settings.measure_all_steps:
            return apply_model(x, sigma, **c)
        try:
            return self._guided_forward(apply_model, x, sigma, c, chunks, step,
                                        update=guided and self.settings.scale_factor > 0)
        except (RuntimeError, ValueError) as exc:  # e.g. another patch that autograd cannot go through
            self._capturing, self._layer_maps, self._pending = False, [], None
            self._warn(f"A-STAR: guidance skipped at step {step}: {exc}")
            return apply_model(x, sigma, **c)

    def post_cfg(self, args):
        denoised, x = args["denoised"], args["input"]
        pending, self._pending = self._pending, None
        if pending is None:
            return denoised
        sigma, latent_move, denoised_shift = pending
        if latent_move.shape != x.shape or abs(float(args["sigma"].max()) - sigma) > 1e-6 * max(sigma, 1.0):
            return denoised
        try:
            x.add_(latent_move.to(x))  # the sampler's own latent: its step now starts from the updated z
        except RuntimeError:  # not writable here (an inference tensor outside inference mode)
            return denoised + latent_move.to(denoised)
        return denoised + denoised_shift.to(denoised)

    # -- the guided pass --------------------------------------------------------------------------
    def _guided_forward(self, apply_model, x, sigma, c, chunks, step, update):
        s = self.settings
        n_chunks = len(chunks)
        batch = x.shape[0] // n_chunks
        cond_chunks = [i for i, kind in enumerate(chunks) if kind == COND]
        refine = update and step in s.refine_at_steps
        alpha = s.scale_factor * astar.step_size(1.0, self.progress(sigma)) if update else 0.0
        with torch.inference_mode(False), torch.enable_grad():
            astar.make_weights_differentiable(self.diffusion_model)
            rows = torch.cat([torch.arange(i * batch, (i + 1) * batch) for i in cond_chunks]).to(x.device)
            x_base, c_work, sigma_work = x.detach().clone(), _clone_tensors(c), sigma.clone()
            scale = self.input_scale(sigma_work[:batch]).to(x_base)
            delta = torch.zeros_like(x_base[:batch])   # the move of the sampler's latent, in x units
            record, output, delta_at_output, best, iters = None, None, delta, None, 0
            while True:
                x_in = (x_base + delta.repeat(n_chunks, *([1] * (delta.ndim - 1)))).requires_grad_(True)
                out, maps = self._forward_capturing(apply_model, x_in, sigma_work, c_work, rows)
                output, delta_at_output = out.detach(), delta
                loss_as, loss_ar = self._losses(maps)
                if record is None:
                    record = StepRecord(step, float(sigma.max()), float(loss_as.detach().mean()),
                                        None if loss_ar is None else float(loss_ar.detach().mean()), alpha, False)
                    binary_next = astar.binarise(maps, s.threshold)
                total = (loss_as + (loss_ar if loss_ar is not None else 0)).sum()
                if not update or not total.requires_grad:
                    break
                grad = None
                if torch.isfinite(total):
                    grad_in = torch.autograd.grad(total, x_in)[0]
                    # z = s x: grad_z = grad_x / s and x' = z' / s, so x moves by -alpha grad_x / s^2.
                    grad = sum(grad_in[i * batch:(i + 1) * batch] for i in cond_chunks) / scale ** 2
                moved, ok = astar.safe_update(delta, grad, alpha)
                if not ok:
                    self._warn(f"A-STAR: the loss or its gradient is NaN/Inf at step {step}; "
                               f"no guidance this step.")
                    break
                delta, iters, record.updated = moved.detach(), iters + 1, True
                current = float(total.detach())
                if not refine or iters >= s.max_refine_iters or (best is not None and current > best * 0.999):
                    break  # refinement stops once the loss stops falling
                best = current
            record.refine_iters = max(iters - 1, 0)
        self.run.previous_binary = binary_next
        self.run.records.append(record)
        if record.updated:
            # The returned prediction was made at x + delta_at_output; reusing its noise estimate at
            # x + delta shifts the denoised estimate by the difference.
            self._pending = (float(sigma.max()), delta, delta - delta_at_output)
        return output

    def _forward_capturing(self, apply_model, x_in, sigma, c, rows):
        self._capturing, self._cond_rows, self._layer_maps = True, rows, []
        try:
            out = apply_model(x_in, sigma, **c)
        finally:
            self._capturing = False
        if not self._layer_maps:
            raise RuntimeError("A-STAR captured no cross-attention maps: the model has no cross-attention "
                               "layer at the chosen blocks.")
        maps = astar.concept_maps(self._layer_maps, self._map_size, self.settings.concept_columns,
                                  self.settings.smoothing)
        self._layer_maps = []
        return out, maps

    def _losses(self, maps):
        normed = astar.normalise(maps)
        loss_as = astar.segregation_loss(normed)
        previous = self.run.previous_binary
        loss_ar = None
        if previous is not None and previous.shape == maps.shape:
            loss_ar = astar.retention_loss(normed, previous)
        return loss_as, loss_ar

    # -- bookkeeping ------------------------------------------------------------------------------
    def _track_step(self, sigma) -> int:
        value = float(sigma.max())
        run = self.run
        if run.last_sigma is None or value > run.last_sigma * (1 + 1e-5):
            if run.records:
                self.runs = (self.runs + [run.records])[-KEEP_RUNS:]
            self.run = run = _Run()
            run.step = 0
        elif value < run.last_sigma * (1 - 1e-5):
            run.step += 1
        run.last_sigma = value
        return run.step

    def _warn(self, message: str) -> None:
        log.warning(message)
        self.warnings = (self.warnings + [message])[-KEEP_RUNS * 4:]

    def all_records(self) -> list[list[StepRecord]]:
        return self.runs + ([self.run.records] if self.run.records else [])


def _clone_tensors(c: dict) -> dict:
    """Copies of the conditioning made outside inference mode, so autograd may save them."""
    out = {}
    for key, value in c.items():
        if torch.is_tensor(value):
            out[key] = value.clone()
        elif isinstance(value, dict) and key != "transformer_options":
            out[key] = _clone_tensors(value)
        else:
            out[key] = value
    return out


def _layer_size(original_shape, tokens: int) -> tuple[int, int]:
    """The (h, w) of a layer with `tokens` queries, from the latent's shape (stride-2 downsampling)."""
    if not original_shape:
        side = int(round(tokens ** 0.5))
        return side, tokens // side
    h, w = original_shape[-2], original_shape[-1]
    while h * w > tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def cross_attention_blocks(diffusion_model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(block name, index, resolution level) of each UNet block holding cross-attention, where the
    level counts the downsamplings (0 = latent size). Read off the module tree by class name."""
    def has_cross_attention(module):
        return any(getattr(m, "attn2", None) is not None for m in module.modules())

    def count(module, name):
        return sum(type(m).__name__ == name for m in module.modules())

    found, level = [], 0
    for i, block in enumerate(getattr(diffusion_model, "input_blocks", [])):
        if has_cross_attention(block):
            found.append(("input", i, level))
        level += count(block, "Downsample")
    middle = getattr(diffusion_model, "middle_block", None)
    if middle is not None and has_cross_attention(middle):
        found.append(("middle", 0, level))
    for i, block in enumerate(getattr(diffusion_model, "output_blocks", [])):
        if has_cross_attention(block):
            found.append(("output", i, level))
        level -= count(block, "Upsample")
    return found


def capture_blocks(diffusion_model: torch.nn.Module, target_level: int = 2) -> list[tuple[str, int]]:
    """The blocks nearest a quarter of the latent's side (16x16 for SD1.x at 512 px, 32x32 for SDXL at
    1024 px, the layers A-STAR and Attend-and-Excite read): every cross-attention block at the level
    closest to `target_level` downsamplings."""
    blocks = cross_attention_blocks(diffusion_model)
    if not blocks:
        return []
    levels = sorted({lvl for _, _, lvl in blocks}, key=lambda lvl: (abs(lvl - target_level), -lvl))
    return [(name, index) for name, index, lvl in blocks if lvl == levels[0]]


# -- the host side, duck-typed: a ComfyUI ModelPatcher and CLIP, never imported ---------------------

def guided_model(model, settings: AStarSettings):
    """A clone of the ModelPatcher `model` with the A-STAR hooks; returns (clone, guidance) so callers can
    read its records. The given model is not changed."""
    patched = model.clone()
    base = patched.model
    sampling = base.model_sampling
    steps_in_schedule = max(len(getattr(sampling, "sigmas", ())) - 1, 1)

    def input_scale(sigma):
        return sampling.calculate_input(sigma, torch.ones((sigma.shape[0], 1, 1, 1), device=sigma.device))

    def progress(sigma):
        return 1.0 - float(sampling.timestep(sigma.max().reshape(1)).float()) / steps_in_schedule

    guidance = AStarGuidance(settings, base.diffusion_model, input_scale, progress)
    blocks = capture_blocks(base.diffusion_model)
    if not blocks:
        raise ValueError("MMIG A-STAR Guidance needs a UNet with cross-attention (SD1.x, SDXL); this model has none.")
    for name, index in blocks:
        patched.set_model_attn2_replace(guidance.attention_replace, name, index)
    for path, norm in astar.residual_norms(base.diffusion_model):  # see astar.residual_norms
        patched.add_object_patch(f"diffusion_model.{path}.forward", astar.forward_on_a_copy(norm.forward))
    patched.set_model_unet_function_wrapper(_chain(patched.model_options.get("model_function_wrapper"),
                                                   guidance.unet_wrapper))
    patched.set_model_sampler_post_cfg_function(guidance.post_cfg)
    return patched, guidance


def _chain(previous, wrapper):
    """Keep a wrapper another node set before ours: ours calls it as its apply_model."""
    if previous is None:
        return wrapper

    def chained(apply_model, args):
        def inner(x, t, **c):
            return previous(apply_model, {**args, "input": x, "timestep": t, "c": c})
        return wrapper(inner, args)
    return chained


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"{what} must be comma-separated whole numbers, e.g. '0,10,20'; got '{text}'.") from None


def concepts_from_clip(clip, prompt: str, concepts: str, token_indices: str):
    """(concept positions, word positions) of the prompt as the host's CLIP tokenizes it; explicit
    token_indices ("2,5", 0 being the start token) take the place of the concept words."""
    tokenizer = clip.tokenizer
    inner = getattr(tokenizer, "clip_l", None) or getattr(tokenizer, getattr(tokenizer, "clip", ""), None)
    start_id, end_id = getattr(inner, "start_token", 49406), getattr(inner, "end_token", 49407)
    inv_vocab = getattr(inner, "inv_vocab", {})

    def describe(token):
        return inv_vocab.get(token, str(token)).replace("</w>", "")

    def ids(text):
        tokens = clip.tokenize(text)
        chunks = tokens["l"] if "l" in tokens else next(iter(tokens.values()))
        return [[t[0] if isinstance(t, (tuple, list)) else int(t) for t in chunk] for chunk in chunks]

    prompt_chunks = ids(prompt)
    if token_indices.strip():
        _, words = resolve_concepts(prompt_chunks, {}, start_id, end_id)
        flat = [t for chunk in prompt_chunks for t in chunk]
        positions = [[i] for i in parse_int_list(token_indices, "token_indices")]
        bad = [p[0] for p in positions if p[0] not in words]
        if bad:
            raise ConceptError(f"token_indices {bad} are not word tokens of the prompt. The prompt's tokens are: "
                               f"{describe_tokens(flat, words, describe)}.")
        return positions, words
    names = [c.strip() for c in concepts.split(",") if c.strip()]
    if not names:
        raise ConceptError("No concept given: write the prompt's words to guide, comma-separated (e.g. 'cat, dog'), "
                           "or give token_indices.")
    concept_ids = {}
    for name in names:
        chunk = ids(name)[0]
        concept_ids[name] = chunk[1:chunk.index(end_id, 1)] if end_id in chunk[1:] else chunk[1:]
    return resolve_concepts(prompt_chunks, concept_ids, start_id, end_id, describe)
