"""LayerDiffusion's layered embedding optimisation (MMIG §3.3, Eqs. 15-18), host-agnostic.

The noise predictor is a callable predict_noise(x_t, sigma, context) -> eps in the k-diffusion
convention (x_t = x_0 + sigma * eps), so the same loop serves a ComfyUI MODEL and a training recipe.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .interrupt import interruptible

log = logging.getLogger("mmig.layered_embeddings")
DEFAULT_ALPHA = 0.7  # MMIG: "the weight value that describes object properties, which is 0.7"


class LayeredInputError(ValueError):
    """An input the optimisation cannot use, with what to fix."""


def blend(e_a: torch.Tensor, e_b: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """e_opt = alpha * e_a + (1 - alpha) * e_b (Eq. 16)."""
    if e_a.shape != e_b.shape:
        raise LayeredInputError(f"The foreground and background embeddings differ in shape ({tuple(e_a.shape)} vs "
                                f"{tuple(e_b.shape)}): encode both prompts with the same CLIP, and keep both "
                                f"within the same number of 75-token chunks.")
    return alpha * e_a + (1 - alpha) * e_b


def masked_noise_loss(noise: torch.Tensor, predicted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|| M * (eps - f(x_t, t, e)) ||^2, averaged over elements (Eqs. 15, 17, 18 share it)."""
    return (mask * (noise - predicted.float())).square().mean()


def latent_mask(mask: torch.Tensor, latent_shape: torch.Size | tuple, what: str = "mask") -> torch.Tensor:
    """A MASK ([H, W] or [B, H, W], values 0..1) resized to the latent: [B, 1, h, w].

    The mask may be at image size or latent size, but must have the latent's aspect ratio, and its
    batch must be 1 or the latent's."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise LayeredInputError(f"The {what} must be a MASK [batch, height, width]; got shape {tuple(mask.shape)}.")
    b, _, h, w = latent_shape
    if mask.shape[0] not in (1, b):
        raise LayeredInputError(f"The {what} has a batch of {mask.shape[0]} but the latent has {b}: give one mask, "
                                f"or one per latent.")
    mh, mw = mask.shape[-2:]
    if abs(mh / mw - h / w) > 0.02 * (h / w):
        raise LayeredInputError(f"The {what} is {mw}x{mh} px but the latent is {w}x{h} (an image of {w * 8}x{h * 8} "
                                f"px): give a mask of the source image's size.")
    resized = F.interpolate(mask[:, None].float(), size=(h, w), mode="area" if mh >= h else "bilinear")
    return resized.clamp(0, 1).expand(b, 1, h, w)


@dataclass
class LayeredResult:
    e_a: torch.Tensor
    e_b: torch.Tensor
    e_opt: torch.Tensor
    losses: list[float] = field(default_factory=list)   # the per-step training loss
    probe_before: float = float("nan")                    # Eq. 15 on fixed (sigma, noise) probes, before
    probe_after: float = float("nan")                     # ... and after the optimisation
    skipped_steps: int = 0


def optimise_layered_embeddings(predict_noise, latent: torch.Tensor, mask: torch.Tensor, e_a: torch.Tensor,
                                e_b: torch.Tensor, sigmas: torch.Tensor, *, steps: int, learning_rate: float,
                                alpha: float = DEFAULT_ALPHA, seed: int = 0, reference: tuple | None = None,
                                probes: int = 4, on_step=None, check_interrupt=None) -> LayeredResult:
    """[e_a, e_b] = argmin E || M * (eps - f(x_t, t, [e_a, e_b])) ||^2 (Eq. 15), noise and timestep
    drawn anew each step; then e_opt = alpha e_a + (1 - alpha) e_b (Eq. 16).

    latent [B, C, h, w] (the encoded source image), mask [B, 1, h, w] at latent size, e_a / e_b
    [1 or B, N, D], sigmas: the noise levels of the model's training schedule to draw from.
    reference = (reference_latent, reference_mask): adds L_fg on the source with M_t = mask and L_bg
    on the reference with 1 - M_r (Eqs. 17-18), both through e_opt, to combine the source's object
    with the reference's background."""
    if steps < 1:
        raise LayeredInputError("steps must be at least 1.")
    gen = torch.Generator().manual_seed(seed)
    latent, mask = latent.detach().float(), mask.detach().float()
    sigmas = sigmas.detach().float().flatten()
    params = [e_a.detach().float().clone().requires_grad_(True), e_b.detach().float().clone().requires_grad_(True)]
    optimiser = torch.optim.Adam(params, lr=learning_rate)
    batch = latent.shape[0]

    def draw(like):
        sigma = sigmas[torch.randint(len(sigmas), (like.shape[0],), generator=gen)]
        noise = torch.randn(like.shape, generator=gen)
        return sigma, noise

    def context(*embeds):
        joined = torch.cat(embeds, dim=1)
        return joined.expand(batch, *joined.shape[1:]) if joined.shape[0] == 1 else joined

    def eq15(sigma, noise):
        x_t = latent + sigma.view(-1, 1, 1, 1).to(latent) * noise.to(latent)
        return masked_noise_loss(noise.to(latent), predict_noise(x_t, sigma.to(latent), context(*params)), mask)

    probe_draws = [draw(latent) for _ in range(probes)]

    def probe() -> float:
        with torch.no_grad():
            return sum(float(eq15(s, n)) for s, n in probe_draws) / max(len(probe_draws), 1)

    result = LayeredResult(params[0], params[1], params[0])
    with interruptible(check_interrupt):  # checks inside each forward and backward, not only between steps
        result.probe_before = probe()
        for i in range(steps):
            if check_interrupt is not None:
                check_interrupt()
            sigma, noise = draw(latent)
            loss = eq15(sigma, noise)
            if reference is not None:
                loss = loss + _recombination_loss(predict_noise, latent, mask, reference, params, alpha, sigma, noise,
                                                  draw, context)
            if not torch.isfinite(loss):
                log.warning("LayeredEmbeddings: NaN/Inf loss at step %d; step skipped.", i)
                result.skipped_steps += 1
            else:
                # The gradient of the two embeddings only (not backward()): no weight of the model gets a .grad.
                for param, grad in zip(params, torch.autograd.grad(loss, params)):
                    param.grad = grad
                optimiser.step()
                result.losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(i)
        result.probe_after = probe()
    e_a_hat, e_b_hat = (p.detach() for p in params)
    result.e_a, result.e_b, result.e_opt = e_a_hat, e_b_hat, blend(e_a_hat, e_b_hat, alpha)
    return result


def _recombination_loss(predict_noise, latent, mask, reference, params, alpha, sigma, noise, draw, context):
    """L_fg (Eq. 17) on the source with M_t, plus L_bg (Eq. 18) on the reference with 1 - M_r, through e_opt."""
    ref_latent, ref_mask = reference
    e_opt = blend(params[0], params[1], alpha)
    x_t = latent + sigma.view(-1, 1, 1, 1) * noise
    l_fg = masked_noise_loss(noise, predict_noise(x_t, sigma, context(e_opt)), mask)
    ref_sigma, ref_noise = draw(ref_latent)
    ref_t = ref_latent + ref_sigma.view(-1, 1, 1, 1) * ref_noise
    l_bg = masked_noise_loss(ref_noise, predict_noise(ref_t, ref_sigma, context(e_opt)), 1 - ref_mask)
    return l_fg + l_bg


def optimise_for_model(base, device, samples, mask, foreground, background, **kwargs):
    """optimise_layered_embeddings on a ComfyUI BaseModel (duck-typed: apply_model, encode_adm,
    model_sampling, diffusion_model), outside the host's inference mode. foreground / background are
    (cond, extras) pairs; SDXL's pooled output is blended like the embeddings and the size
    conditioning kept. Returns (result, the blended conditioning's extras)."""
    from .astar import frozen, make_weights_differentiable, norms_on_copies

    (fg, fg_extra), (bg, bg_extra) = foreground, background
    alpha = kwargs.get("alpha", DEFAULT_ALPHA)
    width, height = samples.shape[-1] * 8, samples.shape[-2] * 8
    blended_extra = dict(fg_extra)
    if "pooled_output" in fg_extra and "pooled_output" in bg_extra:
        blended_extra["pooled_output"] = blend(fg_extra["pooled_output"], bg_extra["pooled_output"], alpha)
    adm_args = {"width": width, "height": height, "target_width": width, "target_height": height,
                **blended_extra, "device": device}
    # Only the embeddings need a gradient: the weights are frozen for the duration and the latent is detached, so
    # the graph holds just what reaches the loss from the cross-attention's keys and values.
    with torch.inference_mode(False), torch.enable_grad(), norms_on_copies(base.diffusion_model), \
            frozen(base.diffusion_model):
        make_weights_differentiable(base.diffusion_model)
        adm = base.encode_adm(**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in adm_args.items()})
        extra = {} if adm is None else {"y": adm.clone().to(device)}

        def predict_noise(x_t, sigma, context):
            x_t, sigma = x_t.to(device), sigma.to(device)
            y = {k: v.expand(x_t.shape[0], *v.shape[1:]) for k, v in extra.items()}
            denoised = base.apply_model(x_t, sigma, c_crossattn=context.to(device), **y)
            return ((x_t - denoised) / sigma.view(-1, 1, 1, 1)).cpu()

        reference = kwargs.pop("reference", None)
        result = optimise_layered_embeddings(
            predict_noise, samples.clone(), mask.clone(), fg.clone(), bg.clone(), base.model_sampling.sigmas.clone(),
            reference=None if reference is None else tuple(t.clone() for t in reference), **kwargs)
    return result, blended_extra
