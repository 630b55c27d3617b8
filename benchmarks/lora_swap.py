"""What switching LoRA adapters costs on ONNX Runtime, against loading the bundle again.

    python benchmarks/lora_swap.py BUNDLE [--rank 16] [--repeats 5] [--json out.json]

Two adapters are written from random tensors (rank `--rank`, every attention and feed-forward
projection of the denoiser and the first text encoder's attention), shaped from the bundle's own
weight map. Measured, each the median of `--repeats`:

- `Pipeline.load` of the bundle (sha256 verification included, as a user pays it);
- `load_lora_weights` of the first adapter (reads it, reads the touched initializers once, builds
  the in-memory sessions of the components it touches);
- a switch A -> B, B -> A, to the mix A 0.7 + B 0.5, and back to the base weights (`set_adapters`);
- a denoising step without and with an adapter (merged weights: the same speed expected);
- memory: each adapter's A/B matrices, the base weights kept for restoring, and the process's RSS
  after load, with both adapters loaded, after the switches, and after the switches once glibc's
  `malloc_trim` has returned the freed heap (re-created sessions leave freed arenas that RSS counts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_adapter(bundle: Path, path: Path, *, rank: int, seed: int) -> Path:
    from safetensors.numpy import save_file

    from latentrt.bundle.manifest import load_manifest
    from latentrt.runtime.families import FAMILIES
    from latentrt.runtime.lora.weights import ComponentWeights

    manifest = load_manifest(bundle, verify=False)
    denoiser = FAMILIES[manifest.family].denoiser
    rng = np.random.default_rng(seed)
    tensors = {}
    for component, suffixes in ((denoiser, (".to_q", ".to_k", ".to_v", ".to_out.0", ".add_q_proj", ".add_k_proj", ".add_v_proj",
                                            ".to_add_out", ".ff.net.0.proj", ".ff.net.2", ".ff_context.net.0.proj", ".ff_context.net.2")),
                                ("text_encoder", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"))):
        if component not in manifest.components:
            continue
        weights = ComponentWeights(component, manifest.components[component].weights)
        for module in sorted(weights.modules):
            if not module.endswith(suffixes):
                continue
            shape = weights.param_shape(f"{module}.weight")
            if len(shape) != 2:
                continue
            tensors[f"{component}.{module}.lora_A.weight"] = rng.standard_normal((rank, shape[1]), dtype=np.float32) * 0.01
            tensors[f"{component}.{module}.lora_B.weight"] = rng.standard_normal((shape[0], rank), dtype=np.float32) * 0.01
    save_file(tensors, str(path))
    return path


def trimmed_rss_mb() -> float:
    """RSS after glibc's `malloc_trim(0)` (memory still in use, not freed heap); NaN off glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return float("nan")
    return rss_mb()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    from latentrt.runtime.backends.cpu import cpu_info
    from latentrt.runtime.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        a = write_adapter(args.bundle, Path(scratch) / "a.safetensors", rank=args.rank, seed=1)
        b = write_adapter(args.bundle, Path(scratch) / "b.safetensors", rank=args.rank, seed=2)
        load_s = median_time(lambda: Pipeline.load(args.bundle, threads=args.threads).close(), args.repeats)
        pipe = Pipeline.load(args.bundle, threads=args.threads)
        d = pipe.manifest.defaults
        call = dict(prompt="a large red circle on the left", num_inference_steps=4, seed=0, height=d.height, width=d.width)
        pipe(**call)
        rss_loaded = rss_mb()
        step_base = statistics.median(t for _ in range(args.repeats) for t in pipe(**call).timings["denoising_steps"])
        start = time.perf_counter()
        pipe.load_lora_weights(a, adapter_name="a")
        first_load_s = time.perf_counter() - start
        pipe.load_lora_weights(b, adapter_name="b")
        pipe(**call)
        rss_adapters = rss_mb()
        switches = {}
        for label, names, weights in (("A -> B", ["b"], None), ("B -> A", ["a"], None), ("A -> mix A 0.7 + B 0.5", ["a", "b"], [0.7, 0.5])):
            back = ["a"] if label != "B -> A" else ["b"]

            def switch(names=names, weights=weights, back=back):
                pipe.set_adapters(back)
                start = time.perf_counter()
                pipe.set_adapters(names, adapter_weights=weights)
                return time.perf_counter() - start

            switches[label] = statistics.median(switch() for _ in range(args.repeats))
        pipe.set_adapters(["a"])
        step_lora = statistics.median(t for _ in range(args.repeats) for t in pipe(**call).timings["denoising_steps"])

        def to_base():
            pipe.set_adapters(["a"])
            start = time.perf_counter()
            pipe.set_adapters([])
            return time.perf_counter() - start

        switches["A -> base"] = statistics.median(to_base() for _ in range(args.repeats))
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.5])
        rss_switched = rss_mb()
        rss_trimmed = trimmed_rss_mb()
        adapters = {name: adapter.nbytes for name, adapter in pipe.lora.adapters.items()}
        result = {
            "bundle": str(args.bundle),
            "cpu": cpu_info().name,
            "rank": args.rank,
            "layers_per_adapter": len(pipe.lora.adapters["a"].layers),
            "components": list(pipe.lora.adapters["a"].components),
            "pipeline_load_s": load_s,
            "first_load_lora_weights_s": first_load_s,
            "switch_s": switches,
            "denoising_step_ms": {"base": step_base * 1e3, "adapter": step_lora * 1e3},
            "adapter_bytes": adapters,
            "kept_base_weights_bytes": pipe.lora.base_nbytes,
            "rss_mb": {"loaded": rss_loaded, "two_adapters": rss_adapters, "after_switches": rss_switched, "after_switches_trimmed": rss_trimmed},
        }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
