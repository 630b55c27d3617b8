"""Pipeline families at run time: the manifest's `family` name -> the class that knows its differences.

Everything that differs between families lives in these classes (one file each, all implementing
runtime/family.py's protocol); the sampling loop in runtime/pipeline.py never branches on a name.
"""

from __future__ import annotations

from latentrt.runtime.family import Family
from latentrt.runtime.family_flux import Flux
from latentrt.runtime.family_pixart import PixArt
from latentrt.runtime.family_sd3 import SD3
from latentrt.runtime.family_unet import StableDiffusion, StableDiffusionXL

FAMILIES: dict[str, type[Family]] = {"sd3": SD3, "flux": Flux, "pixart": PixArt, "sd15": StableDiffusion, "sdxl": StableDiffusionXL}
