"""Which family module exports which diffusers pipeline class: the one place export dispatches on family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from latentrt.errors import InputError
from latentrt.models import flux, pixart, sd3
from latentrt.models import unet
from latentrt.models.spec import FamilyExport


@dataclass(frozen=True)
class Family:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    describe: Callable[..., FamilyExport]


FAMILIES = {
    "StableDiffusion3Pipeline": Family("sd3", sd3.REQUIRED, sd3.OPTIONAL, sd3.sd3_export),
    "StableDiffusionPipeline": Family("sd15", unet.SD15_REQUIRED, unet.OPTIONAL, unet.sd15_export),
    "StableDiffusionXLPipeline": Family("sdxl", unet.SDXL_REQUIRED, unet.OPTIONAL, unet.sdxl_export),
    "FluxPipeline": Family("flux", flux.REQUIRED, flux.OPTIONAL, flux.flux_export),
    "PixArtAlphaPipeline": Family("pixart", pixart.REQUIRED, pixart.OPTIONAL, pixart.pixart_export),
    "PixArtSigmaPipeline": Family("pixart", pixart.REQUIRED, pixart.OPTIONAL, pixart.pixart_export),
}


def for_pipeline_class(class_name: str, path: Path) -> Family:
    if class_name not in FAMILIES:
        raise InputError(
            f"{path}/model_index.json names the pipeline class {class_name!r}, which latentrt cannot export yet; "
            f"supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[class_name]
