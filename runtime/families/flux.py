"""Flux.1 at run time: packed latents, position ids, guidance embedding, dynamic shift."""

from __future__ import annotations

import numpy as np

from latentrt.runtime.families.base import Family
from latentrt.runtime.schedulers.flow_match import FlowMatchEulerConfig, calculate_mu
from latentrt.runtime.schedulers import Schedule, make_schedule


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """[b, c, h, w] -> [b, (h/2)(w/2), 4c]: 2x2 patches as tokens (diffusers' FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: np.ndarray, latent_height: int, latent_width: int) -> np.ndarray:
    """The inverse of `pack_latents`."""
    b, _, channels = packed.shape
    c = channels // 4
    x = packed.reshape(b, latent_height // 2, latent_width // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, latent_height, latent_width)


def image_ids(latent_height: int, latent_width: int) -> np.ndarray:
    """[(h/2)(w/2), 3] float32: (0, row, column) per token."""
    ids = np.zeros((latent_height // 2, latent_width // 2, 3), dtype=np.float32)
    ids[..., 1] = np.arange(latent_height // 2)[:, None]
    ids[..., 2] = np.arange(latent_width // 2)[None, :]
    return ids.reshape(-1, 3)


class Flux(Family):
    """Flux.1 dev/schnell, as diffusers' FluxPipeline.

    - Conditioning: CLIP pooler_output -> pooled_projections; T5 last hidden state -> encoder_hidden_states;
      txt_ids zeros [L, 3]; img_ids from the latent grid.
    - No classifier-free batch: guidance-distilled models take `guidance` [b] = guidance_scale;
      models without a guidance embedding ignore guidance_scale.
    - Timesteps fed as sigma (t / 1000); sigmas linspace(1, 1/N, N) shifted by mu from the image token count.
    - Initial latents are in the packed layout [n, (h/2)(w/2), 64], as diffusers' `latents=` for Flux.
    """

    def setup(self, cond: dict) -> None:
        self.clip = self.require(*cond["clip_encoder"])
        self.t5 = self.require(*cond["t5_encoder"])
        self.guidance_embeds = bool(cond["guidance_embeds"])
        self.flow = FlowMatchEulerConfig.from_diffusers(self.manifest.scheduler["config"])

    def uses_cfg(self, guidance_scale: float) -> bool:
        return False

    def sequence_length_range(self) -> tuple[int, int] | None:
        return self.text_length_range((self.t5[0], "input_ids", 1), (self.denoiser, "encoder_hidden_states", 1))

    def latent_shape(self, n: int, latent_height: int, latent_width: int) -> tuple[int, ...]:
        return (n, (latent_height // 2) * (latent_width // 2), self.manifest.latent.channels * 4)

    def conditioning(self, prompts, negatives, *, cfg, height, width, max_sequence_length) -> dict[str, np.ndarray]:
        pooled = self.encode(*self.clip, prompts)["pooler_output"]
        hidden = self.encode(*self.t5, prompts, max_sequence_length)["last_hidden_state"]
        vae = self.manifest.latent.vae_scale_factor
        return {
            "encoder_hidden_states": hidden,
            "pooled_projections": pooled,
            "txt_ids": np.zeros((hidden.shape[1], 3), dtype=np.float32),
            "img_ids": image_ids(height // vae, width // vae),
        }

    def schedule(self, num_inference_steps: int, latent_height: int, latent_width: int) -> Schedule:
        mu = calculate_mu((latent_height // 2) * (latent_width // 2), self.flow)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return make_schedule(self.manifest.scheduler, num_inference_steps, mu=mu, sigmas=sigmas)

    def denoiser_feeds(self, x: np.ndarray, t: np.float32, cond: dict[str, np.ndarray], guidance_scale: float) -> dict[str, np.ndarray]:
        feeds = {"hidden_states": x, "timestep": np.full((x.shape[0],), np.float32(t) / np.float32(1000), dtype=np.float32), **cond}
        if self.guidance_embeds:
            feeds["guidance"] = np.full((x.shape[0],), guidance_scale, dtype=np.float32)
        return feeds

    def decoder_input(self, latents: np.ndarray, latent_height: int, latent_width: int) -> np.ndarray:
        return super().decoder_input(unpack_latents(latents, latent_height, latent_width), latent_height, latent_width)
