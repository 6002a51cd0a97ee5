"""The anchor of bench/editing.py: Direct Inversion + prompt-to-prompt written from the algorithm (PnPInversion's
DirectInversion.invert / offset_calculate and direct_inversion_p2p_guidance_forward, attention_control.py's
controllers) on diffusers' DDIMScheduler and a diffusers UNet2DConditionModel holding the tiny SD1.x's weights
(devtools/tiny_sd15.diffusers_unet: diffusers' own single-file converter). Nothing of the pack's editing code is
used: its own DDIM steps, its own attention processors with explicit probabilities, its own controller that
counts layers to find the step (as PnPInversion's AttentionControl does), the refine mapper given as data.

Sizes follow PnPInversion's rules where they are written for 512 px: LocalBlend's "down_cross[2:4] + up_cross[:3]"
are the down and up blocks' cross-attention layers at a quarter of the latent's side, the self-attention limit
of 32x32 queries is half the latent's side (the pack's relative form of both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Controller:
    """attention_control.py's AttentionControlEdit on the conditional half [source, target] of the batch."""

    def __init__(self, steps, num_layers, cross_replace_steps, self_replace_steps, latent_hw, *, mapper=None,
                 alphas=None, equalizer=None, blend_words=None, blend_threshold=0.3, blend_start=0.2):
        self.steps, self.num_layers = steps, num_layers
        self.cross_until = int(cross_replace_steps * (steps + 1))
        self.self_until = int(self_replace_steps * steps)
        h, w = latent_hw
        self.self_max = ((h + 1) // 2) * ((w + 1) // 2)
        self.blend_tokens = ((h + 3) // 4) * ((w + 3) // 4)
        self.latent_hw = latent_hw
        self.mapper, self.alphas, self.equalizer = mapper, alphas, equalizer
        self.blend_words, self.blend_threshold = blend_words, blend_threshold
        self.blend_from = int(blend_start * steps)
        self.cur_step = self.cur_layer = self.blend_counter = 0
        self.step_store, self.store = [], None

    def __call__(self, probs, is_cross, place, heads):
        half = probs.shape[0] // 2
        cond = probs[half:].reshape(2, heads, *probs.shape[1:]).clone()
        if is_cross or self.cur_step < self.self_until:
            base, own = cond[0], cond[1]
            if is_cross:
                if self.cur_step < self.cross_until:
                    if self.alphas is not None:
                        new = base[:, :, self.mapper] * self.alphas + own * (1 - self.alphas)
                    else:
                        new = base.clone()
                    if self.equalizer is not None:
                        new = new * self.equalizer
                    cond[1] = new
            elif own.shape[1] <= self.self_max:
                cond[1] = base
        if is_cross and place in ("down", "up") and probs.shape[1] == self.blend_tokens:
            self.step_store.append(cond)
        probs = torch.cat([probs[:half], cond.reshape(-1, *probs.shape[1:])])
        self.cur_layer += 1
        if self.cur_layer == self.num_layers:
            self.cur_layer = 0
            self.cur_step += 1
            if self.step_store:
                step = torch.cat(self.step_store, dim=1)   # [2, layers*heads, q, K]
                self.store = step if self.store is None else self.store + step
            self.step_store = []
        return probs

    def step_callback(self, x_t):
        self.blend_counter += 1
        if self.blend_words is None or self.blend_counter <= self.blend_from:
            return x_t
        h, w = self.latent_hw
        q = self.store.shape[2]
        side = int(round(q ** 0.5))
        maps = self.store.reshape(2, self.store.shape[1], side, q // side, -1)
        maps = (maps * self.blend_words[:, None, None, None, :]).sum(-1).mean(1)[:, None]
        maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        mask = F.interpolate(maps, size=(h, w))
        mask = mask / mask.amax(dim=(2, 3), keepdim=True)
        mask = mask.gt(self.blend_threshold)
        mask = (mask[:1] + mask).float()
        self.last_mask = mask[1:]
        return x_t[:1] + mask * (x_t - x_t[:1])


class Processor:
    def __init__(self, place, holder):
        self.place, self.holder = place, holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = torch.softmax(torch.bmm(q.float(), k.float().transpose(1, 2)) * attn.scale, dim=-1)
        if self.holder.controller is not None:
            probs = self.holder.controller(probs, is_cross, self.place, attn.heads)
        out = attn.batch_to_head_dim(torch.bmm(probs, v.float()).to(v.dtype))
        return attn.to_out[1](attn.to_out[0](out))


class Reference:
    def __init__(self, unet, steps):
        from diffusers import DDIMScheduler
        self.unet, self.steps = unet, steps
        self.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False)
        self.scheduler.set_timesteps(steps)
        self.controller = None
        processors = {}
        for name in unet.attn_processors:
            place = "down" if name.startswith("down") else "up" if name.startswith("up") else "mid"
            processors[name] = Processor(place, self)
        self.num_layers = len(processors)
        unet.set_attn_processor(processors)  # (empties the dict it is given)

    def _alpha(self, t):
        return self.scheduler.alphas_cumprod[t] if t >= 0 else self.scheduler.final_alpha_cumprod

    def _move(self, eps, sample, t_from, t_to):
        a, a_to = self._alpha(t_from), self._alpha(t_to)
        x0 = (sample - (1 - a) ** 0.5 * eps) / a ** 0.5
        return a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps

    def unet_eps(self, latents, t, context):
        return self.unet(latents, t, encoder_hidden_states=context).sample

    @torch.no_grad()
    def invert(self, z0, source):
        ratio = self.scheduler.config.num_train_timesteps // self.steps
        latents, z = [z0], z0.clone()
        for i in range(self.steps):
            t = int(self.scheduler.timesteps[self.steps - i - 1])
            eps = self.unet_eps(z, t, source)
            z = self._move(eps, z, min(t - ratio, 999), t)
            latents.append(z)
        return latents

    @torch.no_grad()
    def offsets(self, latents, context, cfg):
        ratio = self.scheduler.config.num_train_timesteps // self.steps
        out, cur = [], torch.cat([latents[-1]] * 2)
        for i, t in enumerate(self.scheduler.timesteps):
            t = int(t)
            prev = torch.cat([latents[len(latents) - i - 2]] * 2)
            e = self.unet_eps(torch.cat([cur] * 2), t, context)
            u, c = e.chunk(2)
            rec = self._move(u + cfg * (c - u), cur, t, t - ratio)
            out.append(prev - rec)
            cur = rec + out[-1]
        return out

    @torch.no_grad()
    def edit(self, z_t, context, cfg, offsets, controller):
        self.controller = controller
        try:
            latents = torch.cat([z_t] * 2)
            for i, t in enumerate(self.scheduler.timesteps):
                e = self.unet_eps(torch.cat([latents] * 2), t, context)
                u, c = e.chunk(2)
                latents = self.scheduler.step(u + cfg * (c - u), t, latents).prev_sample
                latents = torch.cat([latents[:1] + offsets[i][:1], latents[1:]])
                latents = controller.step_callback(latents)
        finally:
            self.controller = None
        return latents

    def run(self, z0, uncond, source, target, cfg, controller):
        """(edited, source branch) from z0 (the scaled VAE latent)."""
        trajectory = self.invert(z0, source)
        context = torch.cat([uncond, uncond, source, target])
        offsets = self.offsets(trajectory, context, cfg)
        out = self.edit(trajectory[-1], context, cfg, offsets, controller)
        return out[1:], out[:1]
