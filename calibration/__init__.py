"""Post-training quantization of a bundle's denoiser: calibration, SmoothQuant, Q/DQ ONNX for TensorRT.

    from latentrt.calibration import QuantizeConfig, quantize_bundle, compare_bundles

    manifest = quantize_bundle("bundles/sd3", "bundles/sd3-int8", QuantizeConfig(precision="int8"))
    report = compare_bundles("bundles/sd3", "bundles/sd3-int8")  # PSNR on held-out prompts

Modules by step: `prompts` (calibration prompt lists), `collect` (statistics over the denoising
trajectory), `histogram` (percentile / entropy / minmax ranges), `graph` (layers and exclusions),
`smoothquant`, `qdq` (Q/DQ insertion), `cache` (TensorRT calibration cache), `quantize` (the entry
point), `quality` (PSNR against the reference bundle). Needs `onnx` and `ml-dtypes` (the export extra).
"""

from latentrt.calibration.cache import read_calibration_cache, write_calibration_cache
from latentrt.calibration.histogram import Histogram, entropy_amax, percentile_amax
from latentrt.calibration.prompts import load_prompts, prompts_sha256
from latentrt.calibration.quality import QualityReport, compare_bundles, psnr
from latentrt.calibration.quantize import QuantizeConfig, is_quantized, quantize_bundle

__all__ = [
    "Histogram",
    "QualityReport",
    "QuantizeConfig",
    "compare_bundles",
    "entropy_amax",
    "is_quantized",
    "load_prompts",
    "percentile_amax",
    "prompts_sha256",
    "psnr",
    "quantize_bundle",
    "read_calibration_cache",
    "write_calibration_cache",
]
