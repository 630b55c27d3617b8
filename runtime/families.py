"""What differs between pipeline families at run time, in one place.

A family turns prompts into the denoiser's conditioning, and latents plus a timestep into the
denoiser's feeds. The pipeline's sampling loop (runtime/pipeline.py) is the same for every family;
it picks the family named in the manifest from `FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from latentrt.errors import BundleError
from latentrt.runtime.manifest import Manifest
from latentrt.runtime.scheduler_flow_match import FlowMatchEulerConfig, calculate_mu, flow_match_sigmas, flow_match_step
from latentrt.runtime.tokenizer import PromptTokenizer

Engine = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class SD3:
    """Stable Diffusion 3 / 3.5 (MMDiT, flow matching).

    Prompt encoding, as diffusers' StableDiffusion3Pipeline.encode_prompt:
    1. each CLIP encoder's penultimate hidden state [b, 77, w_i], concatenated along features and
       zero-padded to the T5 width (the transformer's joint_attention_dim);
    2. T5's last hidden state [b, L, joint_dim] appended along the sequence (zeros when the bundle has
       no T5 encoder);
    3. the CLIP pooled projections concatenated: pooled_projections [b, sum(proj_i)].
    The transformer takes timestep = sigma * 1000.
    """

    denoiser = "transformer"

    def __init__(self, manifest: Manifest, engines: Mapping[str, Engine], tokenizers: Mapping[str, PromptTokenizer]) -> None:
        cond = manifest.conditioning
        try:
            self._clip = [(engines[enc], tokenizers[tok]) for enc, tok in cond["clip_encoders"]]
            self._t5 = (engines[cond["t5_encoder"][0]], tokenizers[cond["t5_encoder"][1]]) if cond["t5_encoder"] else None
            self._joint_dim = int(cond["joint_attention_dim"])
            self._patch = int(cond["patch_size"])
        except (KeyError, TypeError) as err:
            raise BundleError(f"the manifest's sd3 conditioning block is incomplete ({err!r}); re-export the bundle") from err
        if manifest.scheduler.get("class_name") != "FlowMatchEulerDiscreteScheduler":
            raise BundleError(f"sd3 bundles need FlowMatchEulerDiscreteScheduler, the manifest has {manifest.scheduler.get('class_name')!r}")
        self._scheduler = FlowMatchEulerConfig.from_diffusers(manifest.scheduler["config"])

    def encode_prompts(self, prompts: list[str], *, max_sequence_length: int) -> dict[str, np.ndarray]:
        """Conditioning for `prompts`: encoder_hidden_states [b, 77 + L, joint_dim], pooled_projections [b, P]."""
        hidden, pooled = [], []
        for engine, tokenizer in self._clip:
            out = engine({"input_ids": tokenizer(prompts)})
            hidden.append(out["penultimate_hidden_state"])
            pooled.append(out["text_embeds"])
        clip = np.concatenate(hidden, axis=-1)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, self._joint_dim - clip.shape[-1])))
        if self._t5 is not None and max_sequence_length > 0:
            engine, tokenizer = self._t5
            t5 = engine({"input_ids": tokenizer(prompts, max_sequence_length)})["last_hidden_state"]
        else:
            t5 = np.zeros((len(prompts), max_sequence_length, self._joint_dim), dtype=np.float32)
        return {
            "encoder_hidden_states": np.concatenate([clip, t5], axis=1),
            "pooled_projections": np.concatenate(pooled, axis=-1),
        }

    def schedule(self, num_inference_steps: int, latent_height: int, latent_width: int) -> tuple[np.ndarray, np.ndarray]:
        """sigmas [steps + 1] and the timesteps fed to the transformer [steps]."""
        mu = None
        if self._scheduler.use_dynamic_shifting:
            mu = calculate_mu((latent_height // self._patch) * (latent_width // self._patch), self._scheduler)
        return flow_match_sigmas(self._scheduler, num_inference_steps, mu)

    def denoiser_feeds(self, latents: np.ndarray, timestep: np.float32, cond: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "hidden_states": latents,
            "timestep": np.full((latents.shape[0],), timestep, dtype=np.float32),
            **cond,
        }

    @staticmethod
    def step(latents: np.ndarray, model_output: np.ndarray, sigma: float, sigma_next: float) -> np.ndarray:
        return flow_match_step(latents, model_output, sigma, sigma_next)


FAMILIES = {"sd3": SD3}
