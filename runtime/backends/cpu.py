"""What the host CPU offers the CPU backends: its name and its matrix instructions.

Machines of the same kind differ here (AMD EPYC with AVX2 only, or with AVX-512 and VNNI; Intel Xeon
with AVX-512 bf16/fp16 and AMX), and it changes both speed and results: without VNNI, ONNX Runtime's
x86 int8 GEMM multiplies uint8 activations by int8 weights with `vpmaddubsw`, whose 16-bit pair sums
saturate (255 * 127 * 2 > 32767), so an int8 graph gives wrong values there (measured on tiny-sd3:
relative L2 1.1e-2 against 8.6e-4 for the same Q/DQ graph run exactly).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

_X86 = {"x86_64", "amd64", "i386", "i686"}


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name, architecture and flags (`/proc/cpuinfo` on Linux; empty elsewhere), and
    on x86 its family and model numbers (a VM may report only "AMD EPYC": family 25 model 1 is a
    Milan, 25/17 a Genoa)."""

    name: str
    machine: str
    flags: frozenset[str]
    family: str = ""
    model: str = ""

    @property
    def x86(self) -> bool:
        return self.machine.lower() in _X86

    @property
    def int8_dot(self) -> bool:
        """int8 dot products without 16-bit saturation: VNNI (AVX-512 or AVX) or AMX on x86; every
        other architecture's int8 kernels (ARM sdot/i8mm) accumulate in 32 bits."""
        return not self.x86 or bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    @property
    def bf16(self) -> bool:
        """bf16 matrix arithmetic: AVX-512 bf16 or AMX bf16 (x86)."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    @property
    def amx(self) -> bool:
        """AMX tiles (Intel Xeon Sapphire Rapids and later): bf16 and int8 matrix multiplies."""
        return bool(self.flags & {"amx_bf16", "amx_int8"})

    @property
    def description(self) -> str:
        """The name, family/model where known, and the matrix ISA, for benchmark tables:
        "AMD EPYC (family 25, model 1), avx2"."""
        ids = f" (family {self.family}, model {self.model})" if self.family and self.model else ""
        return f"{self.name}{ids}, {self.matrix_isa}"

    @property
    def matrix_isa(self) -> str:
        """The widest matrix instruction set found, for benchmark tables: amx, avx512_bf16, avx512_vnni,
        avx512, avx2, or the machine name elsewhere."""
        for isa in ("amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2"):
            if isa in self.flags:
                return {"amx_bf16": "amx", "avx512f": "avx512"}.get(isa, isa)
        return self.machine or "unknown"


@functools.cache
def cpu_info() -> CpuInfo:
    """The host CPU (read once per process)."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    return CpuInfo(
        name=fields.get("model name") or platform.processor() or platform.machine(),
        machine=platform.machine(),
        flags=frozenset(fields.get("flags", "").split()),
        family=fields.get("cpu family", ""),
        model=fields.get("model", ""),
    )
