"""What differs between pipeline families at run time, in one place.

The sampling loop in runtime/pipeline.py is the same for every family. It asks the family named in
the manifest (`FAMILIES[manifest.family]`) for:

- `conditioning(prompts, negatives, cfg=...)`: the denoiser's text conditioning; with classifier-free
  guidance the negatives (None when the user gave none) are batched first;
- `latent_shape(n, h, w)`: the initial latents' shape, in the denoiser's layout;
- `schedule(steps, h, w)`: the numpy scheduler's `Schedule` (runtime/schedulers.py);
- `denoiser_feeds(x, t, cond, guidance_scale)` and `model_output(outputs)`: one denoiser call;
- `decoder_input(latents, h, w)`: what the VAE decoder reads;
- `uses_cfg(guidance_scale)`: whether uncond and cond are batched for classifier-free guidance.

`Family` implements the common case (NCHW latents, `sample` output, CFG when guidance > 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from latentrt.errors import BundleError
from latentrt.runtime.manifest import Manifest
from latentrt.runtime.scheduler_flow_match import FlowMatchEulerConfig, calculate_mu
from latentrt.runtime.schedulers import Schedule, make_schedule
from latentrt.runtime.tokenizer import PromptTokenizer

Engine = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Family:
    """Defaults shared by the families; subclasses override what differs."""

    denoiser = "transformer"

    def __init__(self, manifest: Manifest, engines: Mapping[str, Engine], tokenizers: Mapping[str, PromptTokenizer]) -> None:
        self.manifest = manifest
        self.engines = engines
        self.tokenizers = tokenizers
        try:
            self.setup(manifest.conditioning)
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(
                f"the manifest's {manifest.family} conditioning block is incomplete ({err!r}); re-export the bundle"
            ) from err

    def setup(self, conditioning: dict) -> None:
        """Read the family's parameters from the manifest's `conditioning` block."""

    def encode(self, component: str, tokenizer: str, prompts: list[str], max_length: int | None = None) -> dict[str, np.ndarray]:
        return self.engines[component]({"input_ids": self.tokenizers[tokenizer](prompts, max_length)})

    def uses_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    def latent_shape(self, n: int, latent_height: int, latent_width: int) -> tuple[int, ...]:
        return (n, self.manifest.latent.channels, latent_height, latent_width)

    def schedule(self, num_inference_steps: int, latent_height: int, latent_width: int) -> Schedule:
        return make_schedule(self.manifest.scheduler, num_inference_steps)

    def model_output(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return outputs["sample"]

    def decoder_input(self, latents: np.ndarray, latent_height: int, latent_width: int) -> np.ndarray:
        latent = self.manifest.latent
        return (latents / np.float32(latent.scaling_factor) + np.float32(latent.shift_factor)).astype(np.float32)


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
        self.clip = [tuple(pair) for pair in cond["clip_encoders"]]
        self.t5 = tuple(cond["t5_encoder"]) if cond["t5_encoder"] else None
        self.joint_dim = int(cond["joint_attention_dim"])
        self.patch = int(cond["patch_size"])

    def conditioning(self, prompts, negatives, *, cfg, height, width, max_sequence_length) -> dict[str, np.ndarray]:
        """encoder_hidden_states [b, 77 + L, joint_dim] and pooled_projections [b, P]; with `cfg`, the
        rows are [negatives..., prompts...]."""
        text = (negatives or [""] * len(prompts)) + prompts if cfg else prompts
        hidden, pooled = [], []
        for component, tokenizer in self.clip:
            out = self.encode(component, tokenizer, text)
            hidden.append(out["penultimate_hidden_state"])
            pooled.append(out["text_embeds"])
        clip = np.concatenate(hidden, axis=-1)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, self.joint_dim - clip.shape[-1])))
        if self.t5 is not None and max_sequence_length > 0:
            t5 = self.encode(*self.t5, text, max_sequence_length)["last_hidden_state"]
        else:
            t5 = np.zeros((len(text), max_sequence_length, self.joint_dim), dtype=np.float32)
        return {
            "encoder_hidden_states": np.concatenate([clip, t5], axis=1),
            "pooled_projections": np.concatenate(pooled, axis=-1),
        }

    def schedule(self, num_inference_steps: int, latent_height: int, latent_width: int) -> Schedule:
        config = FlowMatchEulerConfig.from_diffusers(self.manifest.scheduler["config"])
        mu = None
        if config.use_dynamic_shifting:
            mu = calculate_mu((latent_height // self.patch) * (latent_width // self.patch), config)
        return make_schedule(self.manifest.scheduler, num_inference_steps, mu=mu)

    def denoiser_feeds(self, x: np.ndarray, t: np.float32, cond: dict[str, np.ndarray], guidance_scale: float) -> dict[str, np.ndarray]:
        return {"hidden_states": x, "timestep": np.full((x.shape[0],), t, dtype=np.float32), **cond}


FAMILIES: dict[str, type[Family]] = {"sd3": SD3}
