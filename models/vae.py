"""The VAE decoder, exported the same way for every family."""

from __future__ import annotations

import torch

from latentrt.models.spec import ComponentExport, TensorTemplate
from latentrt.bundle.manifest import AxisRange, LatentSpec


class VAEDecoderAdapter(torch.nn.Module):
    """latent_sample [b, c, h, w] (already `latents / scaling_factor + shift_factor`) -> sample [b, 3, f*h, f*w] in [-1, 1]."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent_sample):
        return self.model.decode(latent_sample, return_dict=False)[0]


def latent_spec(vae) -> LatentSpec:
    """Latent channels, downsampling factor and scaling/shift factors from an AutoencoderKL's config."""
    cfg = vae.config
    return LatentSpec(
        channels=cfg.latent_channels,
        vae_scale_factor=2 ** (len(cfg.block_out_channels) - 1),
        scaling_factor=float(cfg.scaling_factor),
        shift_factor=float(getattr(cfg, "shift_factor", None) or 0.0),
    )


def vae_decoder_export(vae, *, max_batch: int, latent_axis: AxisRange, validate_latent: int) -> ComponentExport:
    """The decoder with dynamic batch and latent size; traced at 2x the axis minimum, validated at
    `validate_latent` square (batch 1) and a non-square 3m x 6m latent (batch 2), m = multiple_of."""
    m = latent_axis.multiple_of
    trace, odd = 2 * latent_axis.min, 3 * m
    return ComponentExport(
        name="vae_decoder",
        module=VAEDecoderAdapter(vae),
        inputs=(TensorTemplate("latent_sample", ("batch", vae.config.latent_channels, "latent_height", "latent_width")),),
        outputs=(TensorTemplate("sample", ("batch", 3, "height", "width")),),
        axes={"batch": AxisRange(1, 1, max_batch), "latent_height": latent_axis, "latent_width": latent_axis},
        trace_sizes={"batch": 1, "latent_height": trace, "latent_width": trace},
        validate_sizes=(
            {"batch": 1, "latent_height": validate_latent, "latent_width": validate_latent},
            {"batch": 2, "latent_height": odd, "latent_width": 2 * odd},
        ),
    )
