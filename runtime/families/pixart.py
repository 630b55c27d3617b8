"""PixArt-alpha / sigma at run time: masked T5 conditioning, learned-variance output, discrete-time scheduler."""

from __future__ import annotations

import numpy as np

from latentrt.runtime.families.base import Family


class PixArt(Family):
    """PixArt, as diffusers' PixArtAlphaPipeline (without caption cleaning and resolution binning).

    - Conditioning: T5 last hidden state with its attention mask, padded to `max_sequence_length`;
      the negative prompt (default "") is encoded the same way and batched first.
    - The transformer predicts noise and a learned variance (2c channels): the first c are kept.
    - PixArt-alpha 1024 (sample_size 128) is also conditioned on resolution and aspect ratio.
    """

    def setup(self, cond: dict) -> None:
        self.t5 = self.require(*cond["t5_encoder"])
        self.learned_sigma = bool(cond["learned_sigma"])
        self.resolution = bool(cond["resolution_conditioning"])

    def sequence_length_range(self) -> tuple[int, int] | None:
        return self.text_length_range((self.t5[0], "input_ids", 1), (self.denoiser, "encoder_hidden_states", 1))

    def conditioning(self, prompts, negatives, *, cfg, height, width, max_sequence_length) -> dict[str, np.ndarray]:
        text = (negatives or [""] * len(prompts)) + prompts if cfg else prompts
        component, tokenizer = self.t5
        ids, mask = self.tokenizers[tokenizer].with_mask(text, max_sequence_length)
        hidden = self.engines[component]({"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
        cond = {"encoder_hidden_states": hidden, "encoder_attention_mask": mask.astype(np.float32)}
        if self.resolution:
            cond["resolution"] = np.tile(np.array([[height, width]], dtype=np.float32), (len(text), 1))
            cond["aspect_ratio"] = np.full((len(text), 1), height / width, dtype=np.float32)
        return cond

    def denoiser_feeds(self, x: np.ndarray, t: np.float32, cond: dict[str, np.ndarray], guidance_scale: float) -> dict[str, np.ndarray]:
        return {"hidden_states": x, "timestep": np.full((x.shape[0],), t, dtype=np.float32), **cond}

    def model_output(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        out = outputs["sample"]
        return out[:, : out.shape[1] // 2] if self.learned_sigma else out
