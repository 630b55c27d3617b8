"""Pipeline families at run time: the manifest's `family` name -> the class that knows its differences.

Everything that differs between families lives in these classes (one file each, all implementing
runtime/families/base.py's protocol); the sampling loop in runtime/pipeline.py never branches on a name.
"""

from __future__ import annotations

from latentrt.runtime.families.base import Family
from latentrt.runtime.families.flux import Flux
from latentrt.runtime.families.pixart import PixArt
from latentrt.runtime.families.sd3 import SD3
from latentrt.runtime.families.unet import StableDiffusion, StableDiffusionXL

FAMILIES: dict[str, type[Family]] = {"sd3": SD3, "flux": Flux, "pixart": PixArt, "sd15": StableDiffusion, "sdxl": StableDiffusionXL}
