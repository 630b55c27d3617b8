"""CPU feature detection for the CPU backends."""

from __future__ import annotations

import pytest

from latentrt.runtime.backends.cpu import CpuInfo, cpu_info


@pytest.mark.parametrize(
    "machine,flags,int8_dot,bf16,isa",
    [
        ("x86_64", {"avx2", "fma"}, False, False, "avx2"),  # AMD EPYC Milan
        ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, True, False, "avx512_vnni"),  # AMD EPYC Genoa
        ("x86_64", {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}, True, True, "amx"),  # Xeon
        ("x86_64", {"avx2", "avx_vnni"}, True, False, "avx2"),  # client cores with AVX-VNNI
        ("x86_64", set(), False, False, "x86_64"),  # flags unknown: assume the saturating kernels
        ("aarch64", set(), True, False, "aarch64"),
    ],
)
def test_features(machine, flags, int8_dot, bf16, isa):
    info = CpuInfo(name="cpu", machine=machine, flags=frozenset(flags))
    assert (info.int8_dot, info.bf16, info.matrix_isa) == (int8_dot, bf16, isa)


def test_this_machine_is_read():
    info = cpu_info()
    assert info.name and info.machine
    if info.x86 and info.flags:
        assert "sse2" in info.flags
        assert info.family.isdigit() and info.model.isdigit()
        assert info.description == f"{info.name} (family {info.family}, model {info.model}), {info.matrix_isa}"


def test_description_and_amx():
    xeon = CpuInfo("Intel(R) Xeon(R) Platinum 8581C", "x86_64", frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}), "6", "207")
    assert xeon.amx and xeon.description == "Intel(R) Xeon(R) Platinum 8581C (family 6, model 207), amx"
    epyc = CpuInfo("AMD EPYC", "x86_64", frozenset({"avx2", "fma"}))
    assert not epyc.amx and epyc.description == "AMD EPYC, avx2"
