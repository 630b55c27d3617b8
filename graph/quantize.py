"""Per-channel symmetric weight quantization, shared by calibration (writing Q/DQ graphs) and the
runtime (re-quantizing a weight after a LoRA is merged into it).

qmax is 127 for int8 (symmetric, [-127, 127]) and 448 for fp8 E4M3.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Precision = Literal["int8", "fp8"]
QMAX: dict[str, float] = {"int8": 127.0, "fp8": 448.0}


def weight_scales(weight: np.ndarray, axis: int, precision: Precision) -> np.ndarray:
    """Per-channel symmetric scales along `axis`: max |w| over the other axes / qmax (1 for all-zero channels)."""
    other = tuple(i for i in range(weight.ndim) if i != axis)
    amax = np.abs(weight).max(axis=other).astype(np.float32)
    return np.where(amax > 0, amax / np.float32(QMAX[precision]), np.float32(1.0)).astype(np.float32)


def quantize_weight(weight: np.ndarray, scales: np.ndarray, axis: int, precision: Precision) -> np.ndarray:
    """`weight / scale` rounded to int8 (round half to even, clipped to +-127) or cast to float8e4m3fn."""
    shape = [1] * weight.ndim
    shape[axis] = -1
    x = weight.astype(np.float32) / scales.reshape(shape)
    if precision == "int8":
        return np.clip(np.rint(x), -127, 127).astype(np.int8)
    import ml_dtypes

    return np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)


def dequantize_weight(quantized: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    """float32 `quantized * scale` per channel along `axis` (what DequantizeLinear computes)."""
    shape = [1] * quantized.ndim
    shape[axis] = -1
    return quantized.astype(np.float32) * np.asarray(scales, np.float32).reshape(shape)
