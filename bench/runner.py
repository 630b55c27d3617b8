"""`run_bench`: one request through several backends, alternated, with per-stage statistics and the floor."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.bench.flops import gemm_rates, onnx_flops
from latentrt.calibration.quality import compare_pixels
from latentrt.errors import InputError, LatentRTError
from latentrt.runtime.backends.cpu import cpu_info

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "torch-bf16", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8", "tensorrt")
TORCH_BACKENDS = ("torch", "torch-bf16")
INT8_BACKENDS = ("onnxruntime-int8", "openvino-int8")
#: the matrix precisions each backend may run; its floor uses the fastest measured rate among them
BACKEND_PRECISIONS = {
    "torch": ("float32",),
    "torch-bf16": ("float32", "bfloat16"),
    "onnxruntime": ("float32",),
    "onnxruntime-int8": ("float32", "int8"),
    "openvino": ("float32", "bfloat16"),
    "openvino-int8": ("float32", "bfloat16", "int8"),
    "tensorrt": ("float32", "bfloat16", "int8"),
}
STAGES = ("text_encoding", "denoising_step", "vae_decode", "end_to_end")
# Pause before each request: worker threads of the backend that ran just before (OpenMP's in torch)
# keep spinning for a while after their call and would take the cores from the next backend's first
# stage (text encoding measured 7-19 ms on ONNX Runtime depending on whether torch ran just before).
SETTLE_S = 0.3


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark.

    Attributes:
        source: the diffusers pipeline directory (or preset) the torch reference loads.
        bundle: its latentrt bundle; exported into a temporary directory when None.
        int8_bundle: the quantized bundle for the "onnxruntime-int8" and "openvino-int8" backends.
        backends: any of "torch" (diffusers, float32), "torch-bf16" (diffusers with `torch_dtype=torch.bfloat16`),
            "onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8", "tensorrt"; empty: `default_backends()`.
        height, width, guidance_scale: default to the bundle's defaults.
        runs, warmup: timed and untimed repetitions per backend.
        threads: intra-op threads per backend (0: the library's default, all cores).
    """

    source: str
    bundle: str | None = None
    int8_bundle: str | None = None
    backends: tuple[str, ...] = ()
    prompt: str = "a large red circle on the left"
    steps: int = 8
    height: int | None = None
    width: int | None = None
    batch: int = 1
    guidance_scale: float | None = None
    runs: int = 3
    warmup: int = 1
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.backends:
            object.__setattr__(self, "backends", default_backends(int8=self.int8_bundle is not None))
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise InputError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
        if len(set(self.backends)) != len(self.backends):
            raise InputError(f"backends {', '.join(self.backends)} name one twice; list each once")
        for backend in INT8_BACKENDS:
            if backend in self.backends and not self.int8_bundle:
                raise InputError(f"the {backend} backend needs --int8-bundle (a bundle written by `latentrt calibrate`)")
        if self.steps < 1 or self.runs < 1 or self.warmup < 0 or self.batch < 1:
            raise InputError(f"steps, runs and batch must be >= 1 and warmup >= 0 (got {self.steps}, {self.runs}, {self.batch}, {self.warmup})")


def default_backends(*, int8: bool = False) -> tuple[str, ...]:
    """What a user of this machine would compare: diffusers in float32, and in bf16 where the CPU has
    bf16 matrix instructions (one `torch_dtype` argument); latentrt on ONNX Runtime, and on OpenVINO when
    it is installed; with an int8 bundle, both int8 backends."""
    import importlib.util

    openvino = importlib.util.find_spec("openvino") is not None
    backends = ["torch"] + (["torch-bf16"] if cpu_info().bf16 else []) + ["onnxruntime"] + (["openvino"] if openvino else [])
    if int8:
        backends += ["onnxruntime-int8"] + (["openvino-int8"] if openvino else [])
    return tuple(backends)


@dataclass
class BackendResult:
    """Seconds per stage (median/min/max over runs), peak RSS, and comparisons with torch and the floor.

    `speedup_vs_torch`, `max_abs_diff_vs_torch` and `psnr_db_vs_torch` (mean over the batch's images)
    compare with diffusers in float32 ("torch");
    `speedup_vs_fastest_torch` with the faster of "torch" and "torch-bf16" (those that ran).
    `floor_fraction` is the floor's time over the measured one, per stage, with the floor at
    `floor_gflops`: the fastest matrix rate measured on this machine among the precisions the
    backend may run (`BACKEND_PRECISIONS`).
    """

    backend: str
    load_s: float
    peak_rss_mb: float
    stages: dict[str, dict[str, float]]
    end_to_end_median_s: float
    speedup_vs_torch: float | None = None
    max_abs_diff_vs_torch: float | None = None
    floor_fraction: dict[str, float] = field(default_factory=dict)
    speedup_vs_fastest_torch: float | None = None
    floor_gflops: float | None = None
    psnr_db_vs_torch: float | None = None


@dataclass
class BenchReport:
    config: dict[str, Any]
    machine: dict[str, Any]
    flops: dict[str, float]
    floor_s: dict[str, float]
    backends: dict[str, BackendResult]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchReport:
        return cls(**{**d, "backends": {k: BackendResult(**v) for k, v in d["backends"].items()}})

    def to_markdown(self) -> str:
        c, m = self.config, self.machine
        rates = m.get("matrix_gflops") or {"float32": m.get("gemm_gflops_by_library", {"best": m["gemm_gflops"]})}
        fastest_torch = m.get("fastest_torch")
        lines = [
            f"{c['steps']} steps, {c['height']}x{c['width']}, batch {c['batch']}, guidance {c['guidance_scale']}, "
            f"{c['runs']} runs; CPU: {m['cpu']} ({m['cores']} cores); matrix ISA: {m.get('matrix_isa', '?')}",
            "GEMM rates (GFLOP/s): "
            + "; ".join(f"{p} " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()) for p, r in rates.items()),
        ]
        if "torch-bf16" in self.backends and not m.get("bf16", True):
            lines.append("torch-bf16: this CPU has no bf16 matrix instructions; PyTorch emulates bf16 here.")
        lines += [
            "",
            "| backend | end to end (median, min-max) | text encoding | denoising step | VAE decode | speedup vs torch fp32 "
            f"| speedup vs fastest torch ({fastest_torch or '-'}) | peak RSS | max abs diff vs torch | PSNR vs torch "
            "| fraction of the floor (step) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        ratio = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
        for r in self.backends.values():
            s = r.stages
            e2e = s["end_to_end"]
            lines.append(
                f"| {r.backend} | {e2e['median']:.3f} s ({e2e['min']:.3f}-{e2e['max']:.3f}) "
                f"| {s['text_encoding']['median'] * 1e3:.1f} ms | {s['denoising_step']['median'] * 1e3:.1f} ms "
                f"| {s['vae_decode']['median'] * 1e3:.1f} ms | {ratio(r.speedup_vs_torch)} | {ratio(r.speedup_vs_fastest_torch)} "
                f"| {r.peak_rss_mb:.0f} MB | "
                + (f"{r.max_abs_diff_vs_torch:.1e}" if r.max_abs_diff_vs_torch is not None else "-")
                + (f" | {r.psnr_db_vs_torch:.1f} dB" if r.psnr_db_vs_torch is not None else " | -")
                + f" | {r.floor_fraction.get('denoising_step', float('nan')):.2f} |"
            )
        ours = [r for r in self.backends.values() if r.backend not in TORCH_BACKENDS]
        if ours and fastest_torch:
            best = min(ours, key=lambda r: r.end_to_end_median_s)
            lines += ["", f"Fastest latentrt backend: {best.backend}, {ratio(best.speedup_vs_fastest_torch)} over the fastest torch "
                      f"configuration ({fastest_torch})" + (f", {ratio(best.speedup_vs_torch)} over torch fp32." if best.speedup_vs_torch else ".")]
        flops = ", ".join(f"{k} {v / 1e9:.2f} GFLOP" for k, v in self.flops.items())
        floors = sorted({r.floor_gflops for r in self.backends.values() if r.floor_gflops})
        lines += ["", f"FLOPs per call: {flops}; floor per stage at the float32 GEMM rate: "
                  + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.floor_s.items())
                  + ("; floor rates by backend: " + ", ".join(f"{r.backend} {r.floor_gflops:.0f}" for r in self.backends.values() if r.floor_gflops) + " GFLOP/s" if floors else "")]
        return "\n".join(lines)


class _Worker:
    def __init__(self, backend: str, setup: dict[str, Any]) -> None:
        self.backend = backend
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "latentrt.bench.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.ready = self.ask(setup)

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise LatentRTError(f"the {self.backend} benchmark worker exited (code {self.proc.wait()}); run with --debug to see its error")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def run_bench(config: BenchConfig, *, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Run `config` and return the report (see BenchReport.to_markdown / to_dict)."""
    from latentrt.runtime.families import FAMILIES
    from latentrt.bundle.manifest import load_manifest

    with tempfile.TemporaryDirectory(prefix="latentrt-bench-") as tmp:
        tmp = Path(tmp)
        source, bundle = _resolve(config, tmp)
        manifest = load_manifest(bundle)
        d = manifest.defaults
        height, width = config.height or d.height, config.width or d.width
        guidance = d.guidance_scale if config.guidance_scale is None else config.guidance_scale
        family = FAMILIES[manifest.family](manifest, {}, {})
        vae = manifest.latent.vae_scale_factor
        latents = np.random.default_rng(config.seed).standard_normal(
            family.latent_shape(config.batch, height // vae, width // vae), dtype=np.float32
        )
        np.save(tmp / "latents.npy", latents)
        kwargs = {
            "prompt": [config.prompt] * config.batch,
            "num_inference_steps": config.steps,
            "guidance_scale": guidance,
            "height": height,
            "width": width,
            "max_sequence_length": d.max_sequence_length,
        }

        workers: dict[str, _Worker] = {}
        timings: dict[str, list[dict]] = {b: [] for b in config.backends}
        try:
            for backend in config.backends:
                if progress:
                    progress(f"loading {backend}")
                workers[backend] = _Worker(
                    backend,
                    {
                        "backend": backend,
                        "source": str(source),
                        "bundle": str(config.int8_bundle if backend in INT8_BACKENDS else bundle),
                        "threads": config.threads,
                    },
                )
            replies: dict[str, dict] = {}
            order = list(config.backends)
            for rep in range(config.warmup + config.runs):
                if progress:
                    progress(f"repetition {rep + 1}/{config.warmup + config.runs}")
                for backend in order:
                    time.sleep(SETTLE_S)
                    image = tmp / f"{backend}.npy"
                    replies[backend] = workers[backend].ask({"kwargs": kwargs, "latents": str(tmp / "latents.npy"), "image": str(image)})
                    if rep >= config.warmup:
                        timings[backend].append(replies[backend]["timings"])
                order = order[1:] + order[:1]  # rotate so no backend always runs first
        finally:
            for worker in workers.values():
                worker.close()

        images = {b: np.load(tmp / f"{b}.npy") for b in config.backends}
        # After the timed runs, so no thread left by the measurement competes with a backend.
        if progress:
            progress("measuring the GEMM rate")
        rates = gemm_rates(threads=config.threads)
        flops = _stage_flops(bundle, manifest, family, replies, config)

    float32_rate = max(rates["float32"].values())
    floor = {stage: f / float32_rate for stage, f in flops.items()}
    results = {}
    for backend in config.backends:
        runs = timings[backend]
        stages = {
            "text_encoding": _stats([t["text_encoding"] for t in runs]),
            "denoising_step": _stats([float(np.median(t["denoising_steps"])) for t in runs]),
            "vae_decode": _stats([t["vae_decode"] for t in runs]),
            "end_to_end": _stats([t["total"] for t in runs]),
        }
        rate = max(v for p in BACKEND_PRECISIONS[backend] for v in rates.get(p, {}).values())
        results[backend] = BackendResult(
            backend=backend,
            load_s=workers[backend].ready["load_s"],
            peak_rss_mb=replies[backend]["peak_rss_mb"],
            stages=stages,
            end_to_end_median_s=stages["end_to_end"]["median"],
            floor_fraction={s: flops[s] / rate / stages[s]["median"] for s in flops if stages[s]["median"] > 0},
            floor_gflops=rate / 1e9,
        )
    torches = [b for b in TORCH_BACKENDS if b in results]
    fastest_torch = min(torches, key=lambda b: results[b].end_to_end_median_s) if torches else None
    for backend, r in results.items():
        if "torch" in results:
            r.speedup_vs_torch = results["torch"].end_to_end_median_s / r.end_to_end_median_s
            r.max_abs_diff_vs_torch = float(np.abs(images[backend] - images["torch"]).max())
            r.psnr_db_vs_torch = float(np.mean(compare_pixels(images["torch"], images[backend])))
        if fastest_torch:
            r.speedup_vs_fastest_torch = results[fastest_torch].end_to_end_median_s / r.end_to_end_median_s
    cpu = cpu_info()
    machine = {
        "cpu": cpu.description,
        "matrix_isa": cpu.matrix_isa,
        "bf16": cpu.bf16,
        "int8_dot": cpu.int8_dot,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "gemm_gflops": float32_rate / 1e9,
        "matrix_gflops": {p: {k: v / 1e9 for k, v in r.items()} for p, r in rates.items()},
        "fastest_torch": fastest_torch,
    }
    report_config = {**asdict(config), "height": height, "width": width, "guidance_scale": guidance}
    return BenchReport(config=report_config, machine=machine, flops=flops, floor_s=floor, backends=results)


def _resolve(config: BenchConfig, tmp: Path) -> tuple[Path, Path]:
    from latentrt.models.presets import PRESETS, save_preset

    if config.source in PRESETS and not Path(config.source).exists():
        source = save_preset(config.source, tmp / "source")
    else:
        source = Path(config.source)
        if not (source / "model_index.json").is_file():
            raise InputError(f"{config.source!r} is neither a preset nor a diffusers pipeline directory")
    if config.bundle:
        return source, Path(config.bundle)
    from latentrt.export.pipeline import export_pipeline

    export_pipeline(source, tmp / "bundle")
    return source, tmp / "bundle"


def _stage_flops(bundle: Path, manifest, family, replies: dict, config: BenchConfig) -> dict[str, float]:
    """FLOPs per stage for one generation, from the shapes a latentrt worker saw."""
    seen = next((r["shapes"] for b, r in replies.items() if b != "torch" and r.get("shapes")), None)
    if not seen:
        return {}
    generations = config.warmup + config.runs
    flops = {"text_encoding": 0.0, "denoising_step": 0.0, "vae_decode": 0.0}
    for name, record in seen.items():
        if "inputs" not in record:
            continue
        per_call = onnx_flops(bundle / manifest.components[name].file, record["inputs"])
        calls = record["calls"] / generations
        if name == family.denoiser:
            flops["denoising_step"] += per_call
        elif name == "vae_decoder":
            flops["vae_decode"] += per_call * calls
        else:
            flops["text_encoding"] += per_call * calls
    flops["end_to_end"] = flops["text_encoding"] + config.steps * flops["denoising_step"] + flops["vae_decode"]
    return flops
