"""Stable Diffusion 3 / 3.5 at run time: CLIP-L + CLIP-G (+ T5) conditioning, flow matching."""

from __future__ import annotations

import numpy as np

from latentrt.runtime.families.base import Family
from latentrt.runtime.schedulers.flow_match import FlowMatchEulerConfig, calculate_mu
from latentrt.runtime.schedulers import Schedule, make_schedule


class SD3(Family):
    """Stable Diffusion 3 / 3.5 (MMDiT, flow matching).

    Prompt encoding, as diffusers' StableDiffusion3Pipeline.encode_prompt:
    1. each CLIP encoder's penultimate hidden state [b, 77, w_i], concatenated along features and
       zero-padded to the T5 width (the transformer's joint_attention_dim);
    2. T5's last hidden state [b, L, joint_dim] appended along the sequence (zeros when the bundle has
       no T5 encoder);
    3. the CLIP pooled projections concatenated: pooled_projections [b, sum(proj_i)].
    The transformer takes timestep = sigma * 1000. A missing negative prompt is "".
    """

    def setup(self, cond: dict) -> None:
        self.clip = [self.require(*pair) for pair in cond["clip_encoders"]]
        self.t5 = self.require(*cond["t5_encoder"]) if cond["t5_encoder"] else None
        self.joint_dim = int(cond["joint_attention_dim"])
        self.patch = int(cond["patch_size"])
        self.flow = FlowMatchEulerConfig.from_diffusers(self.manifest.scheduler["config"])

    def conditioning(self, prompts, negatives, *, cfg, height, width, max_sequence_length) -> dict[str, np.ndarray]:
        """encoder_hidden_states [b, 77 + L, joint_dim] and pooled_projections [b, P]; with `cfg`, the
        rows are [negatives..., prompts...]."""
        text = (negatives or [""] * len(prompts)) + prompts if cfg else prompts
        hidden, pooled = [], []
        for component, tokenizer in self.clip:
            out = self.encode(component, tokenizer, text, negatives=len(text) - len(prompts))
            hidden.append(out["penultimate_hidden_state"])
            pooled.append(out["text_embeds"])
        clip = np.concatenate(hidden, axis=-1)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, self.joint_dim - clip.shape[-1])))
        if self.t5 is not None and max_sequence_length > 0:
            t5 = self.encode(*self.t5, text, max_sequence_length, negatives=len(text) - len(prompts))["last_hidden_state"]
        else:
            t5 = np.zeros((len(text), max_sequence_length, self.joint_dim), dtype=np.float32)
        return {
            "encoder_hidden_states": np.concatenate([clip, t5], axis=1),
            "pooled_projections": np.concatenate(pooled, axis=-1),
        }

    def sequence_length_range(self) -> tuple[int, int] | None:
        """T5 tokens L: the denoiser's context holds the CLIP tokens + L (L = 0: no T5 tokens)."""
        clip = max(self.manifest.tokenizers[tokenizer].max_length for _, tokenizer in self.clip)
        context = self.text_length_range((self.denoiser, "encoder_hidden_states", 1), offset=clip)
        t5 = self.input_axis(self.t5[0], "input_ids", 1) if self.t5 else None
        if context is None or t5 is None:
            return context
        return context[0], min(context[1], t5.max)

    def schedule(self, num_inference_steps: int, latent_height: int, latent_width: int) -> Schedule:
        mu = None
        if self.flow.use_dynamic_shifting:
            mu = calculate_mu((latent_height // self.patch) * (latent_width // self.patch), self.flow)
        return make_schedule(self.manifest.scheduler, num_inference_steps, mu=mu)

    def denoiser_feeds(self, x: np.ndarray, t: np.float32, cond: dict[str, np.ndarray], guidance_scale: float) -> dict[str, np.ndarray]:
        return {"hidden_states": x, "timestep": np.full((x.shape[0],), t, dtype=np.float32), **cond}
