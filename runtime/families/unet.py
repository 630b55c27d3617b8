"""Stable Diffusion 1.x/2.x and SDXL at run time: CLIP conditioning, a U-Net denoiser, epsilon/v prediction."""

from __future__ import annotations

import numpy as np

from latentrt.runtime.families.base import Family


class StableDiffusion(Family):
    """Stable Diffusion 1.x/2.x (family "sd15").

    Prompt encoding, as diffusers' StableDiffusionPipeline.encode_prompt: the CLIP text encoder's
    `last_hidden_state` [b, 77, hidden] is the U-Net's encoder_hidden_states; a missing negative
    prompt is "". The U-Net takes the scheduler's timestep as float32 [b].
    """

    denoiser = "unet"

    def setup(self, cond: dict) -> None:
        self.text_encoders = [self.require(*pair) for pair in cond["text_encoders"]]
        self.hidden_state = str(cond["hidden_state"])

    def encode_text(self, text: list[str], negatives: int = 0) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
        """Every encoder's chosen hidden state, concatenated along features [len(text), 77, sum(hidden)],
        and each encoder's raw outputs; the first `negatives` rows are negative prompts (see `encode`)."""
        outputs = {
            component: self.encode(component, tokenizer, text, negatives=negatives) for component, tokenizer in self.text_encoders
        }
        hidden = np.concatenate([out[self.hidden_state] for out in outputs.values()], axis=-1)
        return hidden, outputs

    def conditioning(self, prompts, negatives, *, cfg, height, width, max_sequence_length) -> dict[str, np.ndarray]:
        """encoder_hidden_states [b, 77, cross_dim]; with `cfg`, rows are [negatives..., prompts...]."""
        text = (negatives or [""] * len(prompts)) + prompts if cfg else prompts
        hidden, _ = self.encode_text(text, len(text) - len(prompts))
        return {"encoder_hidden_states": hidden}

    def denoiser_feeds(self, x: np.ndarray, t, cond: dict[str, np.ndarray], guidance_scale: float) -> dict[str, np.ndarray]:
        return {"sample": x, "timestep": np.full((x.shape[0],), t, dtype=np.float32), **cond}

    def model_output(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return outputs["out_sample"]  # ONNX forbids naming an output like the `sample` input


class StableDiffusionXL(StableDiffusion):
    """Stable Diffusion XL (family "sdxl").

    Prompt encoding, as diffusers' StableDiffusionXLPipeline.encode_prompt:
    1. both CLIP encoders' penultimate hidden states, concatenated along features:
       encoder_hidden_states [b, 77, 768 + 1280];
    2. text_encoder_2's pooled projection: text_embeds [b, 1280];
    3. time_ids [b, 6] = original size + crop top-left + target size = (h, w, 0, 0, h, w);
    4. with guidance and no negative prompt, when the pipeline sets force_zeros_for_empty_prompt
       (SDXL base does), the unconditional embeddings are zeros instead of the encoding of "".
    """

    def setup(self, cond: dict) -> None:
        super().setup(cond)
        self.pooled = tuple(cond["pooled"])
        self.require(self.pooled[0])
        self.force_zeros = bool(cond["force_zeros_for_empty_prompt"])

    def conditioning(self, prompts, negatives, *, cfg, height, width, max_sequence_length) -> dict[str, np.ndarray]:
        """encoder_hidden_states [b, 77, cross_dim], text_embeds [b, pooled_dim], time_ids [b, 6];
        with `cfg`, rows are [negatives..., prompts...]."""
        zeros = cfg and self.force_zeros and negatives is None
        text = (negatives or [""] * len(prompts)) + prompts if cfg and not zeros else prompts
        hidden, outputs = self.encode_text(text, len(text) - len(prompts))
        component, output = self.pooled
        pooled = outputs[component][output]
        if zeros:
            hidden = np.concatenate([np.zeros_like(hidden), hidden])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        time_ids = np.array([height, width, 0, 0, height, width], dtype=np.float32)
        return {
            "encoder_hidden_states": hidden,
            "text_embeds": pooled,
            "time_ids": np.tile(time_ids, (hidden.shape[0], 1)),
        }

