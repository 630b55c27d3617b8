"""One benchmark backend in its own process, driven by JSON lines on stdin.

Protocol: the first line is {"backend", "source", "bundle", "threads"}; the worker loads and
answers {"ready": true, "load_s"}. Each following line {"kwargs", "latents", "image"} runs one
generation with the latents read from an .npy file, writes the float32 image array to `image` and
answers {"timings", "shapes", "peak_rss_mb"}. Timings are seconds per stage, as `PipelineOutput.timings`.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, so unlike
    getrusage's ru_maxrss it does not inherit the parent's peak across fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Recorder:
    """Wraps an engine (same contract) to record the input shapes it was called with. Everything else
    (the optional `device_loop`, `max_batch`, `close`) is the engine's own, so the pipeline runs the
    same path as without the wrapper (TensorRT: the device loop and its CUDA graph)."""

    def __init__(self, engine, shapes: dict) -> None:
        self.engine, self.shapes = engine, shapes
        self.inputs, self.outputs = engine.inputs, engine.outputs

    def __getattr__(self, name: str):
        return getattr(self.__dict__["engine"], name)

    def __call__(self, feeds):
        self.shapes.setdefault("calls", 0)
        self.shapes["calls"] += 1
        self.shapes["inputs"] = {k: list(v.shape) for k, v in feeds.items()}
        return self.engine(feeds)


class LatentrtBackend:
    def __init__(self, bundle: str, backend: str, threads: int) -> None:
        from latentrt.runtime.pipeline import Pipeline

        runtime = backend.removesuffix("-int8")  # onnxruntime, openvino, tensorrt
        pipe = Pipeline.load(bundle, backend=runtime, threads=threads)
        self.shapes: dict[str, dict] = {name: {} for name in pipe.engines}
        self.pipe = Pipeline(pipe.bundle, pipe.manifest, {n: _Recorder(e, self.shapes[n]) for n, e in pipe.engines.items()})

    def run(self, latents: np.ndarray, kwargs: dict) -> tuple[np.ndarray, dict]:
        out = self.pipe(latents=latents, **kwargs)
        return out.pixels, out.timings


class TorchBackend:
    """diffusers' own pipeline in PyTorch eager mode, with per-stage timing from module hooks.

    `dtype="bfloat16"` is what a user gets with one argument, `torch_dtype=torch.bfloat16`: every
    weight and activation in bf16 (on CPUs with AVX-512 bf16 or AMX, PyTorch's oneDNN kernels use them).
    """

    def __init__(self, source: str, threads: int, dtype: str = "float32") -> None:
        import torch
        from diffusers import DiffusionPipeline

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        # Components listed as [null, null] (an SD3 model without T5) must be passed as None explicitly.
        with open(os.path.join(source, "model_index.json")) as f:
            absent = {k: None for k, v in json.load(f).items() if isinstance(v, list) and v[0] is None}
        self.pipe = DiffusionPipeline.from_pretrained(source, use_safetensors=True, torch_dtype=getattr(torch, dtype), **absent)
        self.pipe.set_progress_bar_config(disable=True)
        self.stages: dict[str, list[float]] = {}
        for name, module in self.pipe.components.items():
            if name.startswith("text_encoder") and module is not None:
                self._time(module, "text_encoding")
        self._time(getattr(self.pipe, "transformer", None) or self.pipe.unet, "denoising_steps")
        self._time(self.pipe.vae.decoder, "vae_decode")
        self.shapes: dict = {}

    def _time(self, module, stage: str) -> None:
        starts: list[float] = []
        module.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter()))
        module.register_forward_hook(lambda m, a, o: self.stages[stage].append(time.perf_counter() - starts.pop()))

    def run(self, latents: np.ndarray, kwargs: dict) -> tuple[np.ndarray, dict]:
        self.stages = {"text_encoding": [], "denoising_steps": [], "vae_decode": []}
        start = time.perf_counter()
        with self.torch.inference_mode():
            # The pipeline casts the latents to its dtype (bf16 for torch-bf16) and returns float32 images.
            images = self.pipe(latents=self.torch.from_numpy(latents), output_type="np", **kwargs).images
        total = time.perf_counter() - start
        # With guidance the pipeline calls the denoiser once per step on the doubled batch.
        timings = {
            "text_encoding": sum(self.stages["text_encoding"]),
            "denoising_steps": self.stages["denoising_steps"],
            "vae_decode": sum(self.stages["vae_decode"]),
            "total": total,
        }
        return images.astype(np.float32), timings


def main() -> int:
    setup = json.loads(sys.stdin.readline())
    start = time.perf_counter()
    if setup["backend"] in ("torch", "torch-bf16"):
        backend = TorchBackend(setup["source"], setup["threads"], "bfloat16" if setup["backend"] == "torch-bf16" else "float32")
    else:
        backend = LatentrtBackend(setup["bundle"], setup["backend"], setup["threads"])
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        image, timings = backend.run(np.load(request["latents"]), request["kwargs"])
        np.save(request["image"], image)
        reply = {"timings": timings, "shapes": backend.shapes, "peak_rss_mb": _peak_rss_mb()}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
