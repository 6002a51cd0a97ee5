"""Direct Inversion (Ju et al., ICLR 2024) with prompt-to-prompt (Hertz et al. 2022): LLMGA's editing of a real image.

Host-agnostic: the model is reached through a callable `eps(z, sigma) -> eps` (z is the UNet's input, the
VP latent; sigma the k-diffusion noise level whose timestep the UNet is told), and the attention hooks are
plain functions of (q, k, v, heads) that a host wires into its UNet. The algorithm follows cure-lab's
PnPInversion (models/p2p/inversion.py, p2p_guidance_forward.py, attention_control.py, seq_aligner.py):

- `invert`: DDIM inversion with the source prompt, no CFG, over DDIM's "leading" timesteps (0, 20, ... 980
  for 50 steps) with set_alpha_to_one=False, so the input latent sits at the level of timestep 0 and the first
  inversion step (0 -> 0) and the last sampling step are the identity. The UNet is asked at the step's
  target timestep, as PnPInversion's next_step does.
- `edit`: prompt-to-prompt CFG sampling of [source, target] from z*_T. Direct Inversion adds to the source
  branch after each step the offset d_i = z*_{t-1} - rec_i, which puts it back on the inversion's trajectory:
  here the source branch is set to z*_{t-1} itself (the same value, and so the source's unconditional pass,
  which only fed rec_i, is dropped: its attention reaches no other row). `target_offset=True` also adds the
  source's d_i to the target branch (PnPInversion's "add-source" ablation): then a target equal to the source
  reproduces the input; the paper's method (False) does not promise that.
- Controllers act on the conditional rows only: cross-attention `replace` (equal token counts) or `refine`
  (an alignment mapper) blended in for steps < int(cross_replace_steps * (steps + 1)); the source's
  self-attention probabilities copied into the target for steps < int(self_replace_steps * steps) on layers of
  at most `self_max_tokens` queries; per-token `reweight` of the target's cross-attention inside the replace
  steps; LocalBlend from the cross-attention maps at a quarter of the latent's side, summed over the steps so
  far, 3x3 max-pooled, nearest-upsampled, over their maximum, > threshold, from step int(0.2 * steps):
  x_t = x_src + mask * (x_t - x_src), the target's mask being the union with the source's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# PnPInversion's defaults (run_editing_p2p.py, attention_control.py) and the P2P paper's.
DDIM_STEPS = 50
GUIDANCE_SCALE = 7.5
CROSS_REPLACE_STEPS = 0.4
SELF_REPLACE_STEPS = 0.6
BLEND_THRESHOLD = 0.3
BLEND_START = 0.2
REWEIGHT_FACTOR = 2.0          # run_editing_p2p.py reweights the target's blend word by 2
TRAIN_TIMESTEPS = 1000
SELF_REPLACE_MAX_TOKENS_512 = 32 ** 2  # PnPInversion's limit at SD1.x 512 px: layers at half the latent's side
ALIGN_GAP, ALIGN_MATCH, ALIGN_MISMATCH = 0, 1, -1  # seq_aligner's ScoreParams(0, 1, -1)

REPLACE, REFINE, REWEIGHT = "replace", "refine", "reweight"
MODES = (REPLACE, REFINE, REWEIGHT)


class EditError(ValueError):
    """Bad input to inversion or prompt-to-prompt, with what to change."""


# -- the schedule -----------------------------------------------------------------------------------

def ddim_timesteps(steps: int, train_timesteps: int = TRAIN_TIMESTEPS) -> list[int]:
    """diffusers' DDIMScheduler timesteps, "leading" spacing, steps_offset 0: descending, ending at 0."""
    if not 1 <= steps <= train_timesteps:
        raise EditError(f"steps must be between 1 and {train_timesteps}; got {steps}.")
    ratio = train_timesteps // steps
    return [k * ratio for k in range(steps - 1, -1, -1)]


@dataclass
class Schedule:
    timesteps: list[int]        # descending, sampling order
    sigmas: list[float]         # the noise level of each timestep
    final_sigma: float          # where the last sampling step lands: timestep 0's level (set_alpha_to_one=False)

    @classmethod
    def from_sigmas(cls, all_sigmas: Sequence[float], steps: int) -> "Schedule":
        """`all_sigmas[t]` the model's noise level at training timestep t (a host's model_sampling.sigmas)."""
        timesteps = ddim_timesteps(steps, len(all_sigmas))
        return cls(timesteps, [float(all_sigmas[t]) for t in timesteps], float(all_sigmas[0]))

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def next_sigma(self, i: int) -> float:
        return self.sigmas[i + 1] if i + 1 < self.steps else self.final_sigma


def alpha_bar(sigma: float) -> float:
    return 1.0 / (1.0 + sigma * sigma)


def ddim_move(z: torch.Tensor, eps: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """Deterministic DDIM from level sigma_from to sigma_to with the noise estimate eps (either direction)."""
    a_from, a_to = alpha_bar(sigma_from), alpha_bar(sigma_to)
    x0 = (z - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
    return math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps


def invert(z0: torch.Tensor, schedule: Schedule, eps: Callable[[torch.Tensor, float], torch.Tensor],
           on_step: Callable[[int], None] | None = None,
           check_interrupt: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """DDIM inversion: [z*_0 (the input), z*_1, ... z*_T], one entry per step plus the input.

    Step k moves from timestep t_{k-1}'s level (the final level for k = 0) to t_k's, the UNet asked at t_k
    on the current latent. A step between equal levels is the identity and asks nothing."""
    ascending = list(reversed(schedule.sigmas))
    trajectory = [z0]
    z, level = z0, schedule.final_sigma
    for k, sigma in enumerate(ascending):
        if check_interrupt:
            check_interrupt()
        if sigma == level:
            z = z.clone()
        else:
            z = ddim_move(z, eps(z, sigma), level, sigma)
        trajectory.append(z)
        level = sigma
        if on_step:
            on_step(k)
    return trajectory


# -- words and tokens -------------------------------------------------------------------------------

def describe_tokens(ids: Sequence[int], decode: Callable[[int], str]) -> str:
    return ", ".join(f"{i}:'{decode(t)}'" for i, t in enumerate(ids))


def word_positions(prompt_ids: Sequence[int], word_ids: Sequence[int]) -> list[int]:
    """Positions (0 = the start token) of every occurrence of the token run `word_ids` in the prompt."""
    n = len(word_ids)
    if n == 0:
        return []
    return [p + j for p in range(len(prompt_ids) - n + 1) if list(prompt_ids[p:p + n]) == list(word_ids)
            for j in range(n)]


def replacement_mapper(source_ids: Sequence[int], target_ids: Sequence[int], context_tokens: int,
                       decode: Callable[[int], str] = str) -> torch.Tensor:
    """`replace`'s word mapper [K, K]. With equal token counts every source token maps onto the target token at
    its position (seq_aligner's mapper is the identity then); different counts need `refine`."""
    if len(source_ids) != len(target_ids):
        raise EditError(
            f"mode replace needs prompts of the same number of tokens; the source has {len(source_ids)} "
            f"({describe_tokens(source_ids, decode)}) and the target {len(target_ids)} "
            f"({describe_tokens(target_ids, decode)}). Use mode refine for prompts of different lengths.")
    return torch.eye(context_tokens)


def global_align(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """Needleman-Wunsch of token sequences (gap 0, match 1, mismatch -1; ties: insertion, then deletion, then
    diagonal, as seq_aligner): for each y position the aligned x position, -1 where y's token is new."""
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]
    move = [[0] * (ny + 1) for _ in range(nx + 1)]
    for j in range(1, ny + 1):
        score[0][j], move[0][j] = j * ALIGN_GAP, 1
    for i in range(1, nx + 1):
        score[i][0], move[i][0] = i * ALIGN_GAP, 2
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left = score[i][j - 1] + ALIGN_GAP
            up = score[i - 1][j] + ALIGN_GAP
            diag = score[i - 1][j - 1] + (ALIGN_MATCH if x[i - 1] == y[j - 1] else ALIGN_MISMATCH)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else 2 if best == up else 3
    mapping = [-1] * ny
    i, j = nx, ny
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            mapping[j] = i
        elif move[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return mapping


def refinement_mapper(source_ids: Sequence[int], target_ids: Sequence[int],
                      context_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`refine`'s (mapper [K] long, alphas [K]): target position j takes the source's column mapper[j] with
    weight alphas[j] (0 for tokens new in the target); positions past the target's tokens keep their own."""
    if max(len(source_ids), len(target_ids)) > context_tokens:
        raise EditError(f"a prompt has more tokens than the context's {context_tokens}.")
    aligned = global_align(source_ids, target_ids)
    mapper = torch.arange(context_tokens)
    alphas = torch.ones(context_tokens)
    for j, i in enumerate(aligned):
        mapper[j] = i if i >= 0 else j
        alphas[j] = 1.0 if i >= 0 else 0.0
    return mapper, alphas


def token_mask(ids: Sequence[int], words: Sequence[tuple[str, Sequence[int]]], context_tokens: int) -> torch.Tensor:
    """[K] with 1 at the positions of every given (name, word ids) found in the prompt `ids`."""
    mask = torch.zeros(context_tokens)
    for _, word_ids in words:
        for p in word_positions(ids, word_ids):
            if p < context_tokens:
                mask[p] = 1.0
    return mask


def resolve_words(names_and_ids: Sequence[tuple[str, Sequence[int]]], prompts: dict[str, Sequence[int]],
                  what: str, decode: Callable[[int], str] = str) -> None:
    """A clear error for a word found in none of the prompts, listing each prompt's tokens."""
    for name, word_ids in names_and_ids:
        if not word_ids or not any(word_positions(ids, word_ids) for ids in prompts.values()):
            listing = "; ".join(f"{label}: {describe_tokens(ids, decode)}" for label, ids in prompts.items())
            raise EditError(f"{what} word '{name}' is not in the {' or '.join(prompts)} prompt. "
                            f"Use a word of the prompt as tokenized: {listing}.")


# -- the controllers --------------------------------------------------------------------------------

def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in float32: [B, N, heads*d] x [B, M, heads*d] -> [B, heads, N, M]."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.float().reshape(b, n, heads, d).transpose(1, 2)
    kh = k.float().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)


def apply_probabilities(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, M] applied to v [B, M, heads*d] -> [B, N, heads*d] in v's dtype."""
    b, heads, n, m = probs.shape
    vh = v.float().reshape(b, m, heads, -1).transpose(1, 2)
    return (probs @ vh).transpose(1, 2).reshape(b, n, -1).to(v.dtype)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b = q.shape[0]
    qh, kh, vh = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(b, q.shape[1], -1)


@dataclass
class Blend:
    source_words: torch.Tensor            # [K] token mask in the source prompt
    target_words: torch.Tensor            # [K] token mask in the target prompt
    threshold: float = BLEND_THRESHOLD
    start: float = BLEND_START


@dataclass
class ControllerSettings:
    steps: int
    mode: str = REFINE
    cross_replace_steps: float = CROSS_REPLACE_STEPS
    self_replace_steps: float = SELF_REPLACE_STEPS
    self_max_tokens: int = SELF_REPLACE_MAX_TOKENS_512
    replace_mapper: torch.Tensor | None = None     # [K, K] (replace)
    refine_mapper: torch.Tensor | None = None      # [K] long (refine)
    refine_alphas: torch.Tensor | None = None      # [K]
    equalizer: torch.Tensor | None = None          # [K] per target token (reweight)
    blend: Blend | None = None
    blend_tokens: int | None = None                # queries of the layers LocalBlend reads (a quarter of the side)

    def __post_init__(self):
        if self.mode not in MODES:
            raise EditError(f"mode must be one of {', '.join(MODES)}; got '{self.mode}'.")
        for name in ("cross_replace_steps", "self_replace_steps"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise EditError(f"{name} is a fraction of the steps, between 0 and 1; got {value}.")
        if self.replace_mapper is None and self.refine_mapper is None:
            raise EditError("prompt-to-prompt needs a word mapper (replace) or an alignment mapper (refine).")

    @property
    def cross_until(self) -> int:
        """PnPInversion's get_time_words_attention_alpha: steps + 1 rows, 1 below int(fraction * rows)."""
        return int(self.cross_replace_steps * (self.steps + 1))

    @property
    def self_until(self) -> int:
        return int(self.self_replace_steps * self.steps)

    @property
    def blend_from(self) -> int:
        """LocalBlend's counter passes int(start * steps) at this step index."""
        return int(self.blend.start * self.steps) if self.blend else self.steps


class P2PController:
    """The attention hooks and the per-step state. `rows` = (source row, target row) of the conditional half
    of the UNet batch. The edit loop sets `step`; `counts` records what fired, per (kind, step)."""

    def __init__(self, settings: ControllerSettings, rows: tuple[int, int]):
        self.s = settings
        self.src, self.tgt = rows
        self.step = 0
        self.counts: dict[tuple[str, int], int] = {}
        self.layers_seen: dict[tuple[str, int], set] = {}
        self._step_maps: list[torch.Tensor] = []     # this step's [2, h, w, K] head-means, one per blend layer
        self._store: torch.Tensor | None = None      # running sum over steps of the per-step layer means
        self._map_hw: tuple[int, int] | None = None

    def _count(self, kind: str, layer=None) -> None:
        key = (kind, self.step)
        self.counts[key] = self.counts.get(key, 0) + 1
        if layer is not None:
            self.layers_seen.setdefault(key, set()).add(layer)

    def fired(self, kind: str) -> dict[int, int]:
        """step -> how many layers did `kind` ('self', 'cross', 'blend_maps')."""
        return {step: n for (k, step), n in sorted(self.counts.items()) if k == kind}

    def needs_maps(self, step: int) -> bool:
        return self.s.blend is not None and step >= self.s.blend_from

    # -- hooks --------------------------------------------------------------------------------------
    def self_attention(self, q, k, v, heads: int, layer=None) -> torch.Tensor:
        out = plain_attention(q, k, v, heads)
        if self.step >= self.s.self_until or q.shape[1] > self.s.self_max_tokens:
            return out
        rows = [self.src, self.tgt]
        probs = attention_probabilities(q[rows], k[rows], heads)
        # The target's own values, attended with the source's probabilities; the source row as computed.
        both = apply_probabilities(probs[[0, 0]], v[rows])
        out = out.clone()
        out[self.src], out[self.tgt] = both[0], both[1]
        self._count("self", layer)
        return out

    def cross_attention(self, q, k, v, heads: int, hw: tuple[int, int] | None = None, layer=None,
                        blend_layer: bool = True) -> torch.Tensor:
        """`blend_layer` False keeps a layer's maps out of LocalBlend (PnPInversion reads the down and up blocks'
        16x16 maps, not the middle block's)."""
        s = self.s
        replacing = self.step < s.cross_until
        capture = blend_layer and s.blend is not None and hw is not None and q.shape[1] == s.blend_tokens
        if not replacing and not capture:
            return plain_attention(q, k, v, heads)
        out = plain_attention(q, k, v, heads).clone()
        rows = [self.src, self.tgt]
        probs = attention_probabilities(q[rows], k[rows], heads)
        base, own = probs[0], probs[1]
        if replacing:
            own = self._replace_cross(base, own)
            probs = torch.stack([base, own])
            self._count("cross", layer)
        both = apply_probabilities(probs, v[rows])
        out[self.src], out[self.tgt] = both[0], both[1]
        if capture:
            self._step_maps.append(probs.mean(dim=1).reshape(2, hw[0], hw[1], -1))
            self._map_hw = hw
            self._count("blend_maps", layer)
        return out

    def _replace_cross(self, base: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """attention_control.py's AttentionReplace / AttentionRefine (then AttentionReweight's equalizer),
        fully blended in during the replace steps (its alpha_words is 1 there for every token)."""
        s = self.s
        if s.refine_mapper is not None:
            alphas = s.refine_alphas.to(base)
            mapped = base[..., s.refine_mapper.to(base.device)] * alphas + own * (1 - alphas)
        else:
            mapped = base @ s.replace_mapper.to(base)
        if s.equalizer is not None:
            mapped = mapped * s.equalizer.to(base)
        return mapped

    # -- between steps ------------------------------------------------------------------------------
    def end_step(self) -> None:
        if self._step_maps:
            step_mean = torch.stack(self._step_maps).mean(dim=0)
            self._store = step_mean if self._store is None else self._store + step_mean
        self._step_maps = []

    def blend_mask(self, latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """The target's LocalBlend mask [1, 1, H, W] (union of the source's and the target's), or None."""
        b = self.s.blend
        if b is None or self._store is None:
            return None
        words = torch.stack([b.source_words, b.target_words]).to(self._store)   # [2, K]
        maps = (self._store * words[:, None, None, :]).sum(-1)[:, None]          # [2, 1, h, w]
        maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        maps = F.interpolate(maps, size=latent_hw)
        peak = maps.amax(dim=(2, 3), keepdim=True)
        mask = (maps / peak.clamp_min(torch.finfo(maps.dtype).tiny)).gt(b.threshold)
        return (mask[:1] | mask[1:]).float()


# -- the edit loop ----------------------------------------------------------------------------------

def batch_layout(target_offset: bool) -> list[str]:
    """The rows of the edit's UNet batch, in order (the host builds its contexts in this order)."""
    return (["uncond_source"] if target_offset else []) + ["uncond_target", "cond_source", "cond_target"]


@dataclass
class EditResult:
    edited: torch.Tensor
    source: torch.Tensor
    model_calls: int = 0
    offsets_norm: list[float] = field(default_factory=list)   # |d_i| of the source branch (target_offset only)
    mask: torch.Tensor | None = None


def edit(trajectory: Sequence[torch.Tensor], schedule: Schedule, eps: Callable[[torch.Tensor, float], torch.Tensor],
         controller: P2PController, cfg: float, target_offset: bool = False, start: torch.Tensor | None = None,
         on_step: Callable[[int], None] | None = None,
         check_interrupt: Callable[[], None] | None = None) -> EditResult:
    """Prompt-to-prompt from z*_T with the source branch held on the inversion's trajectory.

    `eps(batch, sigma)` gets the rows of `batch_layout(target_offset)` stacked and returns their noise
    estimates; `controller` is wired into that model's attention. `start` replaces z*_T for the target."""
    n = schedule.steps
    if len(trajectory) != n + 1:
        raise EditError(f"the inversion holds {len(trajectory) - 1} steps but the schedule has {n}.")
    layout = batch_layout(target_offset)
    row = {name: i for i, name in enumerate(layout)}
    x = (start if start is not None else trajectory[n]).clone()
    result = EditResult(x, trajectory[0])
    hw = tuple(x.shape[-2:])
    for i in range(n):
        if check_interrupt:
            check_interrupt()
        sigma, sigma_next = schedule.sigmas[i], schedule.next_sigma(i)
        z_src, z_src_next = trajectory[n - i], trajectory[n - i - 1]
        controller.step = i
        if sigma == sigma_next and not controller.needs_maps(i):
            x_next = x.clone()  # DDIM between equal levels: the identity, nothing to ask
            if target_offset:
                x_next = x_next + (z_src_next - z_src)
        else:
            rows = {"uncond_source": z_src, "uncond_target": x, "cond_source": z_src, "cond_target": x}
            e = eps(torch.cat([rows[name] for name in layout]), sigma)
            result.model_calls += 1
            e_tgt = e[row["uncond_target"]:][:1] + cfg * (e[row["cond_target"]:][:1] - e[row["uncond_target"]:][:1])
            if target_offset:
                u, c = e[row["uncond_source"]:][:1], e[row["cond_source"]:][:1]
                e_src = u + cfg * (c - u)
                result.offsets_norm.append(float((z_src_next - ddim_move(z_src, e_src, sigma, sigma_next)).abs().max()))
                # rec_tgt + d_i, written as z*_{t-1} + (rec_tgt - rec_src) (DDIM is linear in z and eps): the
                # same value, and exactly z*_{t-1} while the target has not left the source
                x_next = z_src_next + ddim_move(x - z_src, e_tgt - e_src, sigma, sigma_next)
            else:
                x_next = ddim_move(x, e_tgt, sigma, sigma_next)
        controller.end_step()
        if controller.needs_maps(i):
            mask = controller.blend_mask(hw)
            if mask is not None:
                x_next = z_src_next + mask.to(x_next) * (x_next - z_src_next)
                result.mask = mask
        x = x_next
        if on_step:
            on_step(i)
    result.edited = x
    return result
