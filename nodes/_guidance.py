"""Attention guidance during sampling (A-STAR, Attend-and-Excite), in the host's patch protocol.

The maths lives in mmig_core/astar.py; this file hooks it into a cloned MODEL. Nothing of the host is
imported (the ModelPatcher and CLIP are duck-typed), so in-process tests and benches use it directly.

- `attention_replace(q, k, v, extra_options)`: the attn2 replacement at the capture layers; during a
  guided pass it computes explicit probabilities and records each layer's maps.
- `unet_wrapper(apply_model, args)`: on guided steps runs the sampler's CFG batch with gradients,
  reads the maps, moves the latent (z <- z - alpha grad_z loss; Attend-and-Excite with its iterative
  refinement), then predicts again on the moved latent, as both papers do. `reuse_prediction` (a_star
  only) keeps the prediction of the gradient pass instead: one UNet forward less per guided step.
- `post_cfg(args)`: moves the sampler's own latent (in place: its step starts from the moved z).

The gradient graph holds only what the loss needs (`lean_graph`, on by default; issue 18 item 3): the losses read
only the capture layers' maps, so the pass with gradients runs the sampler's cond rows alone (the uncond rows'
maps are never read and the UNet treats each row on its own), and it stops at the last capture layer (a private
exception from that layer's hook, caught here): the blocks after it (SDXL's 64x64 and 128x128 up-blocks, its
most expensive activations) neither run nor record a graph. Where that pass's prediction is needed (reuse_prediction,
steps that only measure), the full batch runs and the blocks after the last capture layer run without gradients.
The latent moves identically to float tolerance (tests/unit/test_guidance_lean_graph.py).

Which steps are guided: the first `guided_steps` of a sampling run (A&E's max_iter_to_alter, kept for saved
workflows) that also lie inside [start_percent, end_percent] of the schedule, read off the noise level as the
host's own start/end controls (ControlNet, conditioning ranges) do. Interruption is checked before every guided
UNet pass, refinement iterations included; progress is the sampler's own bar (guidance runs inside its steps).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..mmig_core import astar
from ..mmig_core.astar import ConceptError, describe_tokens, resolve_concepts
from ..mmig_core.interrupt import interruptible

log = logging.getLogger("mmig.astar")
COND = 0  # the host's marker for the conditional chunk of a batch
KEEP_RUNS = 8  # loss records of the last sampling runs kept for inspection
A_STAR, ATTEND_AND_EXCITE = "a_star", "attend_and_excite"
MODES = (A_STAR, ATTEND_AND_EXCITE)


@dataclass
class AStarSettings:
    concept_positions: list[list[int]]   # context positions of each concept's tokens
    word_positions: list[int]            # the prompt's word tokens: a_star's text softmax runs over these
    guided_steps: int = astar.ATTEND_EXCITE_GUIDED_STEPS
    scale_factor: float = astar.ATTEND_EXCITE_SCALE_FACTOR
    threshold: float = astar.BINARISE_THRESHOLD
    smoothing: tuple[int, float] = astar.ATTEND_EXCITE_SMOOTHING
    refine_at_steps: tuple[int, ...] = ()
    max_refine_iters: int = astar.ATTEND_EXCITE_MAX_REFINE_ITERS
    measure_all_steps: bool = False      # evidence runs: log the losses after the guided steps too
    mode: str = A_STAR
    refine_thresholds: tuple[float, ...] = ()  # attend_and_excite: one per refinement step
    normalise_maps: bool = True          # a_star: each map over its maximum before L_AS / L_AR (the pack's own)
    reuse_prediction: bool = False       # a_star: keep the gradient pass's prediction (faster, not the paper's)
    start_percent: float = 0.0           # guide only between these fractions of the schedule (host convention)
    end_percent: float = 1.0
    lean_graph: bool = True              # the graph holds only what the loss needs (see the module docstring)

    def __post_init__(self):
        if not (0.0 <= self.start_percent <= self.end_percent <= 1.0):
            raise ValueError(f"start_percent and end_percent must satisfy 0 <= start_percent <= end_percent <= 1; "
                             f"got start_percent={self.start_percent}, end_percent={self.end_percent}.")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got '{self.mode}'.")
        if self.mode == ATTEND_AND_EXCITE:
            if not self.refine_at_steps and not self.refine_thresholds:
                self.refine_at_steps = tuple(astar.ATTEND_EXCITE_THRESHOLDS)
                self.refine_thresholds = tuple(astar.ATTEND_EXCITE_THRESHOLDS.values())
            if len(self.refine_at_steps) != len(self.refine_thresholds):
                raise ValueError(f"attend_and_excite needs one refine_threshold per refine_at_steps step: got steps "
                                 f"{list(self.refine_at_steps)} and thresholds {list(self.refine_thresholds)} "
                                 f"(A&E's are steps 0,10,20 with 0.05,0.5,0.8; leave both empty for those).")
            self.reuse_prediction = False  # A&E always predicts again on the updated latent

    @property
    def refinement(self) -> dict[int, float | None]:
        """Refinement steps -> A&E's threshold (None in a_star mode: refine while the loss falls)."""
        if self.mode == ATTEND_AND_EXCITE:
            return dict(zip(self.refine_at_steps, self.refine_thresholds))
        return dict.fromkeys(self.refine_at_steps)

    @property
    def concept_columns(self) -> list[list[int]]:
        """Each concept's columns among the word positions (a_star's text softmax output order)."""
        index = {p: i for i, p in enumerate(self.word_positions)}
        return [[index[p] for p in group] for group in self.concept_positions]

    @property
    def token_positions(self) -> list[int]:
        """attend_and_excite's token indices: every token of every concept, each excited on its own."""
        return [p for group in self.concept_positions for p in group]


@dataclass
class StepRecord:
    step: int
    sigma: float
    segregation: float
    retention: float | None
    alpha: float
    updated: bool
    refine_iters: int = 0
    attend_excite: float | None = None   # attend_and_excite's loss before the step's updates


@dataclass
class _Run:
    step: int = -1
    last_sigma: float | None = None
    previous_binary: torch.Tensor | None = None
    records: list[StepRecord] = field(default_factory=list)


class _CapturedEveryLayer(Exception):
    """Raised by the last capture layer's hook to end a pass with gradients there (caught in _forward_capturing)."""


class GuidanceOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """The guided pass did not fit; a torch OutOfMemoryError, so the host frees its models as for its own."""


class AStarGuidance:
    def __init__(self, settings: AStarSettings, diffusion_model: torch.nn.Module, input_scale, progress,
                 sigma_window: tuple[float, float] = (float("inf"), 0.0), check_interrupt=None,
                 capture_layers: int | None = None, may_stop_early: bool = True):
        """input_scale(sigma [B]) -> [B, 1, 1, 1]: the host's x -> UNet-input factor (z = s * x).
        progress(sigma) -> float in [0, 1]: how far through the training schedule the noise level is
        (the step-size schedule's fallback on hosts that do not tell the sampler's sigmas).
        sigma_window = (highest, lowest) noise level guided: start_percent and end_percent as sigmas.
        check_interrupt(): raises when the user cancelled; called at every hooked attention layer and at every
        module forward and every tensor the guided passes save or read back (mmig_core.interrupt), since a refinement step runs up to
        max_refine_iters guided forward + backward passes between two of the sampler's own checks.
        capture_layers: how many attention layers the capture blocks hold (the last one ends a lean pass; None:
        unknown, the pass runs to the end). may_stop_early: False when another node's UNet wrapper sits between
        ours and the model (an exception through it might upset it): the blocks after the last capture layer then
        run without gradients instead of not at all."""
        self.capture_layers = capture_layers
        self.may_stop_early = may_stop_early
        self._stop_mode: str | None = None   # during a pass: None, "stop" or "no_grad" after the last capture layer
        self.cond_rows_only = True  # the pass with gradients on the cond rows alone (False after a patch refused it)
        self._last_cond_only = False
        self.settings = settings
        self.sigma_window = sigma_window
        self.check_interrupt = check_interrupt
        self.diffusion_model = diffusion_model
        self.input_scale = input_scale
        self.progress = progress
        self.capture_calls: dict[tuple, int] = {}  # block key -> calls during guided passes (tests count them)
        self.run = _Run()
        self.runs: list[list[StepRecord]] = []
        self._capturing = False
        self._cond_rows: torch.Tensor | None = None
        self._layer_maps: list[torch.Tensor] = []
        self._heads = 0
        self._map_size: tuple[int, int] | None = None
        self._pending: tuple[float, torch.Tensor, torch.Tensor] | None = None
        self.warnings: list[str] = []
        if settings.mode == A_STAR and len(settings.concept_positions) < 2:
            self._warn("A-STAR got fewer than two concepts: the segregation term L_AS is skipped, only "
                       "the retention term L_AR guides.")

    # -- hooks ------------------------------------------------------------------------------------
    def attention_replace(self, q, k, v, extra_options):
        if self.check_interrupt is not None:  # per layer: one guided forward can take seconds on a CPU
            self.check_interrupt()
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
        if self.settings.mode == ATTEND_AND_EXCITE:
            self._layer_maps.append(probs[self._cond_rows].sum(dim=1))
            self._heads += heads
        else:
            self._layer_maps.append(astar.text_token_maps(probs[self._cond_rows], self.settings.word_positions))
        self._map_size = astar.layer_size(extra_options.get("original_shape"), q.shape[1])
        if self._stop_mode is not None and self.capture_layers and len(self._layer_maps) >= self.capture_layers:
            if self._stop_mode == "stop":
                raise _CapturedEveryLayer()
            torch.set_grad_enabled(False)  # the rest of the UNet: no graph (restored in _forward_capturing)
        return astar.attention_output(probs, v)

    def unet_wrapper(self, apply_model, args):
        x, sigma, c, chunks = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        if COND not in chunks:  # an uncond-only batch after the guided cond one: same (moved) latent
            return apply_model(self._moved(x, sigma, len(chunks)), sigma, **c)
        step = self._track_step(sigma)
        if not self._guides(step, sigma):
            return apply_model(x, sigma, **c)
        out_of_memory = None
        for attempt in range(2):
            try:
                return self._guided_forward(apply_model, x, sigma, c, chunks, step)
            except (RuntimeError, ValueError) as exc:
                self._capturing, self._layer_maps, self._heads, self._pending = False, [], 0, None
                if is_out_of_memory(exc):
                    out_of_memory = out_of_memory_message(step, exc, x, len(chunks), self.settings)
                    break
                if self._last_cond_only and attempt == 0:
                    # Some other patch may not take the cond rows alone: the whole batch, from now on.
                    self.cond_rows_only = False
                    self._warn(f"A-STAR: the pass with gradients on the cond rows alone failed ({exc}); "
                               f"running it on the whole batch.")
                    continue
                # An error, not a skipped step: sampling on unguided would give an image A-STAR never touched.
                raise RuntimeError(guided_pass_failure(step, exc, c.get("transformer_options", {}))) from exc
        # Raised outside the except block: the failed pass's frames (its graph) are not kept alive by the traceback.
        free_accelerator_cache()
        raise GuidanceOutOfMemoryError(out_of_memory)

    def post_cfg(self, args):
        denoised, x = args["denoised"], args["input"]
        pending, self._pending = self._pending, None
        if pending is None or not self._same_sigma(pending[0], args["sigma"]):
            return denoised
        _, latent_move, denoised_shift = pending
        if latent_move.shape != x.shape:
            return denoised
        try:
            x.add_(latent_move.to(x))  # the sampler's own latent: its step now starts from the updated z
        except RuntimeError:  # not writable here (an inference tensor outside inference mode)
            return denoised + latent_move.to(denoised)
        return denoised + denoised_shift.to(denoised)

    # -- the guided pass --------------------------------------------------------------------------
    def in_window(self, sigma) -> bool:
        """Whether the noise level lies inside [start_percent, end_percent] (the host's percent_to_sigma)."""
        high, low = self.sigma_window
        value = float(sigma.max())
        return low * (1 - 1e-6) <= value <= high * (1 + 1e-6)

    def _guides(self, step: int, sigma) -> bool:
        s = self.settings
        if s.measure_all_steps:
            return True
        if not self.in_window(sigma):
            return False
        if step < s.guided_steps:
            return True
        return s.mode == ATTEND_AND_EXCITE and step in s.refinement  # A&E refines there even past max_iter_to_alter

    def _guided_forward(self, apply_model, x, sigma, c, chunks, step):
        s = self.settings
        n_chunks = len(chunks)
        batch = x.shape[0] // n_chunks
        cond_chunks = [i for i, kind in enumerate(chunks) if kind == COND]
        inside = self.in_window(sigma)
        update = step < s.guided_steps and s.scale_factor > 0 and inside
        refine = s.scale_factor > 0 and step in s.refinement and inside
        alpha = self._alpha(sigma, c) if (update or refine) else 0.0

        def repeat(delta, times=n_chunks):
            return delta.repeat(times, *([1] * (delta.ndim - 1)))

        # The pass's own prediction is needed where it is returned: reuse_prediction, or a step that only measures.
        need_output = s.reuse_prediction or not (update or refine)
        cond_only = (s.lean_graph and not need_output and len(cond_chunks) < n_chunks and self.cond_rows_only)
        self._last_cond_only = cond_only

        with torch.inference_mode(False), torch.enable_grad(), interruptible(self.check_interrupt), \
                astar.frozen(self.diffusion_model):
            astar.make_weights_differentiable(self.diffusion_model)
            rows = torch.cat([torch.arange(i * batch, (i + 1) * batch) for i in cond_chunks]).to(x.device)
            x_base, c_work, sigma_work = x.detach().clone(), _clone_tensors(c), sigma.clone()
            scale = self.input_scale(sigma_work[:batch]).to(x_base)
            if cond_only:  # the pass with gradients on the cond rows alone: their maps are all the loss reads
                x_base, sigma_work = x_base[rows], sigma_work[rows.to(sigma_work.device)]
                c_work = _cond_rows_of(c_work, rows, x.shape[0], [chunks[i] for i in cond_chunks])
                rows, grad_chunks = torch.arange(len(rows), device=x.device), list(range(len(cond_chunks)))
            else:
                grad_chunks = cond_chunks
            n_in = x_base.shape[0] // batch

            def evaluate(delta):
                if self.check_interrupt is not None:
                    self.check_interrupt()  # a refinement step may run max_refine_iters UNet passes
                x_in = (x_base + repeat(delta, n_in)).requires_grad_(True)
                out, maps = self._forward_capturing(apply_model, x_in, sigma_work, c_work, rows, need_output)
                return (None if out is None else out.detach()), maps, x_in

            def gradient(loss, x_in):
                """grad of the summed loss with respect to the sampler's latent, as an x-space move per unit
                alpha: z = s x, so grad_z = grad_x / s and x' = z' / s moves x by -alpha grad_x / s^2."""
                if not loss.requires_grad or not torch.isfinite(loss).all():
                    return None
                if self.check_interrupt is not None:
                    self.check_interrupt()
                grad_in = torch.autograd.grad(loss.sum(), x_in)[0]
                return sum(grad_in[i * batch:(i + 1) * batch] for i in grad_chunks) / scale ** 2

            delta = torch.zeros_like(x_base[:batch])   # the move of the sampler's latent, in x units
            run = self._attend_excite if s.mode == ATTEND_AND_EXCITE else self._a_star
            record, delta, output, delta_at_output = run(evaluate, gradient, delta, step, float(sigma.max()),
                                                         alpha, update, refine)
        self.run.records.append(record)
        if not record.updated:
            # a lean pass that stopped at the last capture layer made no prediction: the latent did not move
            return output if output is not None else apply_model(x, sigma, **c)
        if s.reuse_prediction:
            # The returned prediction was made at x + delta_at_output; reusing its noise estimate at
            # x + delta shifts the denoised estimate by the difference.
            self._pending = (float(sigma.max()), delta, delta - delta_at_output)
            return output
        self._pending = (float(sigma.max()), delta, torch.zeros_like(delta))
        return apply_model(x + repeat(delta).to(x), sigma, **c)  # a fresh prediction on the moved latent

    def _a_star(self, evaluate, gradient, delta, step, sigma, alpha, update, refine):
        """Eqs. 19-20: one update z <- z - alpha grad(L_AS + L_AR); at a refinement step, repeated while the
        loss falls (the pack's stopping rule: A-STAR publishes none), at most max_refine_iters times."""
        s = self.settings
        record, best, iters = None, None, 0
        while True:
            output, maps, x_in = evaluate(delta)
            delta_at_output = delta
            loss_as, loss_ar = self._a_star_losses(maps)
            if record is None:
                record = StepRecord(step, sigma, float(loss_as.detach().mean()),
                                    None if loss_ar is None else float(loss_ar.detach().mean()), alpha, False)
                binary_next = astar.binarise(maps, s.threshold)
            total = loss_as + (loss_ar if loss_ar is not None else 0)
            if not update:
                break
            delta, ok = self._move(delta, gradient(total, x_in), alpha, step)
            if not ok:
                break
            iters, record.updated = iters + 1, True
            current = float(total.detach().sum())
            if not refine or iters >= s.max_refine_iters or (best is not None and current > best * 0.999):
                break  # refinement stops once the loss stops falling
            best = current
        record.refine_iters = max(iters - 1, 0)
        self.run.previous_binary = binary_next
        return record, delta, output, delta_at_output

    def _attend_excite(self, evaluate, gradient, delta, step, sigma, alpha, update, refine):
        """diffusers' StableDiffusionAttendAndExcitePipeline, step i: at a refinement step whose loss is above
        1 - threshold, update until it is not (each iteration: loss at z, z <- z - alpha grad, stop once that
        loss was at or below the target, or after max_refine_iters), then measure again; then, for
        i < max_iter_to_alter (guided_steps), one more update. Per image of the batch, as A&E loops."""
        s = self.settings
        output, maps, x_in = evaluate(delta)
        loss = astar.attend_excite_loss(maps)
        record = StepRecord(step, sigma, 0.0, None, alpha, False, attend_excite=float(loss.detach().max()))
        iters = 0
        if refine:
            target = max(0.0, 1.0 - s.refinement[step])
            active = loss.detach() > target
            while bool(active.any()):
                iters += 1
                if iters > 1:
                    output, maps, x_in = evaluate(delta)
                    loss = astar.attend_excite_loss(maps)
                delta, ok = self._move(delta, gradient(loss, x_in), alpha, step, active & (loss.detach() > 0))
                if not ok:
                    break
                record.updated = True
                active = active & (loss.detach() > target)
                if iters >= s.max_refine_iters:
                    break
            if iters:
                output, maps, x_in = evaluate(delta)
                loss = astar.attend_excite_loss(maps)
        delta_at_output = delta
        if update and bool((loss.detach() > 0).any()):
            delta, ok = self._move(delta, gradient(loss, x_in), alpha, step, loss.detach() > 0)
            record.updated = record.updated or ok
        record.refine_iters = iters
        return record, delta, output, delta_at_output

    def _move(self, delta, grad, alpha, step, mask=None):
        if mask is not None and grad is not None:
            grad = grad * mask.to(grad).reshape(-1, *([1] * (grad.ndim - 1)))
        moved, ok = astar.safe_update(delta, grad, alpha)
        if not ok:
            self._warn(f"A-STAR: the loss or its gradient is NaN/Inf at step {step}; no guidance this step.")
        return moved.detach(), ok

    def _alpha(self, sigma, c) -> float:
        """A&E's alpha_i = scale * sqrt(linspace(1, 0.5, steps)[i]). Hosts since mid-2024 pass the sampler's
        sigmas (transformer_options["sample_sigmas"]); older ones do not, and i / (steps - 1) is then
        estimated from the noise level (1 - t / t_max: within 2 % of it for 50 DDIM steps)."""
        sigmas = c.get("transformer_options", {}).get("sample_sigmas")
        if sigmas is not None and len(sigmas) > 1:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
            i = int((sigmas[:-1] - float(sigma.max())).abs().argmin())
            return astar.attend_excite_step_size(self.settings.scale_factor, i, len(sigmas) - 1)
        return self.settings.scale_factor * astar.step_size(1.0, self.progress(sigma))

    def _forward_capturing(self, apply_model, x_in, sigma, c, rows, need_output=True):
        """One UNet pass recording the capture layers' maps. Lean (settings.lean_graph): after the last capture
        layer the pass stops (returns None for the prediction) unless need_output, or unless another wrapper sits
        in between; then the rest runs without gradients."""
        self._capturing, self._cond_rows, self._layer_maps, self._heads = True, rows, [], 0
        if self.settings.lean_graph and self.capture_layers:
            self._stop_mode = "stop" if (self.may_stop_early and not need_output) else "no_grad"
        grad_before = torch.is_grad_enabled()
        try:
            out = apply_model(x_in, sigma, **c)
        except _CapturedEveryLayer:
            out = None
        finally:
            self._capturing, self._stop_mode = False, None
            torch.set_grad_enabled(grad_before)
        if not self._layer_maps:
            raise RuntimeError("A-STAR captured no cross-attention maps: the model has no cross-attention "
                               "layer at the chosen blocks.")
        s = self.settings
        if s.mode == ATTEND_AND_EXCITE:
            maps = astar.attend_excite_maps(self._layer_maps, self._heads, self._map_size, s.token_positions,
                                            s.smoothing)
        else:
            maps = astar.concept_maps(self._layer_maps, self._map_size, s.concept_columns, s.smoothing)
        self._layer_maps, self._heads = [], 0
        return out, maps

    def _a_star_losses(self, maps):
        normed = astar.normalise(maps) if self.settings.normalise_maps else maps
        loss_as = astar.segregation_loss(normed)
        previous = self.run.previous_binary
        loss_ar = None
        if previous is not None and previous.shape == maps.shape:
            loss_ar = astar.retention_loss(normed, previous)
        return loss_as, loss_ar

    def _moved(self, x, sigma, n_chunks):
        pending = self._pending
        if pending is None or self.settings.reuse_prediction or not self._same_sigma(pending[0], sigma):
            return x
        delta = pending[1]
        if x.shape[0] != delta.shape[0] * n_chunks or x.shape[1:] != delta.shape[1:]:
            return x
        return x + delta.repeat(n_chunks, *([1] * (delta.ndim - 1))).to(x)

    @staticmethod
    def _same_sigma(value: float, sigma) -> bool:
        return abs(float(sigma.max()) - value) <= 1e-6 * max(value, 1.0)

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


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, MPS, XPU) or the CPU allocator's 'not enough memory' RuntimeError."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


def out_of_memory_message(step: int, exc: BaseException, x: torch.Tensor, n_chunks: int, settings) -> str:
    """The guided pass did not fit: how much it asked for and what to change."""
    import re
    text = str(exc)
    asked = re.search(r"tried to allocate ([0-9.]+ ?[KMGT]?i?B)", text, re.IGNORECASE)
    asked_bytes = re.search(r"tried to allocate (\d+) bytes", text, re.IGNORECASE)
    if asked_bytes:
        needed = f"{int(asked_bytes.group(1)) / 2 ** 30:.2f} GiB more"
    elif asked:
        needed = asked.group(1) + " more"
    else:
        needed = "more memory than was free"
    where = ""
    if x.device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(x.device)
        where = f" ({free / 2 ** 30:.2f} GiB of the GPU's {total / 2 ** 30:.2f} GiB were free)"
    h, w = x.shape[-2] * 8, x.shape[-1] * 8
    return (f"MMIG A-STAR Guidance ran out of memory in its pass with gradients at step {step}: it needed {needed}"
            f"{where}, at {w}x{h} px, a batch of {x.shape[0] // max(n_chunks, 1)} and {n_chunks} cond/uncond "
            f"chunk(s). Generate at a smaller size or batch, guide fewer steps (guided_steps, now "
            f"{settings.guided_steps}; 0 turns guidance off), or start ComfyUI with --lowvram so that the UNet's "
            f"weights leave room for the gradients. Nothing was changed; the next prompt runs as usual.")


def free_accelerator_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cond_rows_of(c: dict, rows: torch.Tensor, full_batch: int, cond_kinds: list) -> dict:
    """The model's keyword arguments for the cond rows of its batch: every batched tensor (c_crossattn, y,
    c_concat, ControlNet residuals) sliced, transformer_options told the chunks that are left."""
    def pick(value):
        if torch.is_tensor(value) and value.ndim and value.shape[0] == full_batch:
            return value[rows.to(value.device)]
        if isinstance(value, dict):
            return {k: pick(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(pick(v) for v in value)
        return value

    out = {}
    for key, value in c.items():
        if key == "transformer_options":
            options = dict(value)
            kinds = options.get("cond_or_uncond")
            options["cond_or_uncond"] = list(cond_kinds)
            uuids = options.get("uuids")
            if isinstance(uuids, (list, tuple)) and kinds is not None and len(uuids) == len(kinds):
                options["uuids"] = [u for u, kind in zip(uuids, kinds) if kind == COND]
            out[key] = options
        else:
            out[key] = pick(value)
    return out


def guided_pass_failure(step: int, exc: Exception, transformer_options: dict) -> str:
    """What to tell the user when the pass with gradients fails: the error, and the MODEL's other patches
    (the usual cause: one holding tensors made under the host's inference mode, or changing them in place)."""
    patches = transformer_options.get("patches") or {}
    named = [f"{kind}: {', '.join(getattr(p, '__qualname__', type(p).__name__) for p in items)}"
             for kind, items in patches.items() if items]
    others = f"this MODEL's other patches are {'; '.join(named)}" if named else "this MODEL has no other patches"
    return (f"MMIG A-STAR Guidance could not run its pass with gradients at step {step}: {exc} ({others}). "
            f"A node that patched the MODEL before A-STAR may not support gradients; give A-STAR the MODEL "
            f"without that node's patch, or bypass A-STAR.")


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


# -- the host side, duck-typed: a ComfyUI ModelPatcher and CLIP, never imported ---------------------

def guided_model(model, settings: AStarSettings, check_interrupt=None):
    """A clone of the ModelPatcher `model` with the guidance hooks; returns (clone, guidance) so callers can
    read its records. The given model is not changed. `check_interrupt` (the node passes the host's) is
    called before each guided UNet pass."""
    base = model.model
    blocks = astar.capture_blocks(base.diffusion_model)
    if not blocks:
        raise ValueError(no_cross_attention_message(base))
    patched = model.clone()
    base = patched.model
    sampling = base.model_sampling
    steps_in_schedule = max(len(getattr(sampling, "sigmas", ())) - 1, 1)

    def input_scale(sigma):
        return sampling.calculate_input(sigma, torch.ones((sigma.shape[0], 1, 1, 1), device=sigma.device))

    def progress(sigma):
        return 1.0 - float(sampling.timestep(sigma.max().reshape(1)).float()) / steps_in_schedule

    window = (float(sampling.percent_to_sigma(settings.start_percent)),
              float(sampling.percent_to_sigma(settings.end_percent)))
    previous_wrapper = patched.model_options.get("model_function_wrapper")
    guidance = AStarGuidance(settings, base.diffusion_model, input_scale, progress, window, check_interrupt,
                             capture_layers=astar.capture_layer_count(base.diffusion_model, blocks),
                             may_stop_early=previous_wrapper is None)
    for name, index in blocks:
        patched.set_model_attn2_replace(guidance.attention_replace, name, index)
    for path, norm in astar.residual_norms(base.diffusion_model):  # see astar.residual_norms
        patched.add_object_patch(f"diffusion_model.{path}.forward", astar.forward_on_a_copy(norm.forward))
    patched.set_model_unet_function_wrapper(_chain(patched.model_options.get("model_function_wrapper"),
                                                   guidance.unet_wrapper))
    patched.set_model_sampler_post_cfg_function(guidance.post_cfg)
    return patched, guidance


def no_cross_attention_message(base) -> str:
    """Why a model cannot be guided: A-STAR reads the UNet's text cross-attention (attn2 in its transformer
    blocks); DiTs (SD3, Flux, ...) join text and image in one attention and have no such blocks."""
    diffusion = base.diffusion_model
    unet = any(hasattr(diffusion, name) for name in ("input_blocks", "middle_block", "output_blocks"))
    kind = (f"its UNet ({type(diffusion).__name__}) has no cross-attention (attn2) transformer blocks" if unet else
            f"it is not a UNet ({type(base).__name__} / {type(diffusion).__name__}, e.g. a DiT such as SD3 or "
            f"Flux, whose text and image share one attention)")
    return (f"MMIG A-STAR Guidance needs a UNet with text cross-attention (SD1.x, SDXL and their fine-tunes): "
            f"{kind}. Connect an SD1.x or SDXL checkpoint's MODEL, or leave this node out for this model.")


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


def parse_float_list(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, e.g. '0.05,0.5,0.8'; got '{text}'.") from None


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
