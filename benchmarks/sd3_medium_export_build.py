"""Export (and optionally build) a full-size SD3-medium-config MMDiT: ~2B parameters, random weights, fp16.

Measures what the issue asks of a 24 GB machine: export wall time and peak RSS, then the
TensorRT-RTX ahead-of-time build for SM 8.9 (wall time, peak RSS, engine size). Each phase runs in
its own process so peak RSS is per phase. Usage:

    python benchmarks/sd3_medium_export_build.py OUT_DIR [--build]

Tracing uses a small latent (16x16) and 16 text tokens; the dynamic axes carry the real sizes.
The ONNX validation against PyTorch is skipped here (fp16 arithmetic on CPU is slow): the unit
tests validate the same exporter on small configs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def export(out: Path) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel

    from latentrt.export.onnx_export import export_component, parameter_bytes
    from latentrt.models.sd3 import SD3TransformerAdapter
    from latentrt.models.spec import ComponentExport, TensorTemplate
    from latentrt.bundle.manifest import AxisRange

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = SD3Transformer2DModel(  # stabilityai/stable-diffusion-3-medium transformer config
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
        )
    model = model.to_empty(device="cpu").to(torch.float16)
    for p in model.parameters():  # cheap random init, fixed seed
        torch.nn.init.normal_(p, std=0.02)
    built = time.perf_counter() - start
    axis = AxisRange(4, 128, 192, multiple_of=2)
    comp = ComponentExport(
        name="transformer",
        module=SD3TransformerAdapter(model),
        inputs=(
            TensorTemplate("hidden_states", ("batch", 16, "latent_height", "latent_width"), "float16"),
            TensorTemplate("encoder_hidden_states", ("batch", "context_length", 4096), "float16"),
            TensorTemplate("pooled_projections", ("batch", 2048), "float16"),
            TensorTemplate("timestep", ("batch",), "float16", 0.0, 1000.0),
        ),
        outputs=(TensorTemplate("sample", ("batch", 16, "latent_height", "latent_width")),),
        axes={"batch": AxisRange(1, 2, 2), "latent_height": axis, "latent_width": axis, "context_length": AxisRange(77, 333, 589)},
        trace_sizes={"batch": 1, "latent_height": 16, "latent_width": 16, "context_length": 16 + 77},
        validate_sizes=(),
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "transformer.onnx"
    export_component(comp, path)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_gb": parameter_bytes(model) / 1e9,
        "init_s": built,
        "export_s": time.perf_counter() - start - built,
        "onnx_gb": sum(f.stat().st_size for f in out.iterdir()) / 1e9,
    }


def build(out: Path) -> dict:
    from latentrt.engines.build import build_serialized_engine
    from latentrt.engines.library import load_library

    library = load_library("tensorrt-rtx")
    shapes = {
        "hidden_states": ((1, 16, 128, 128), (2, 16, 128, 128), (2, 16, 128, 128)),
        "encoder_hidden_states": ((1, 333, 4096), (2, 333, 4096), (2, 333, 4096)),
        "pooled_projections": ((1, 2048), (2, 2048), (2, 2048)),
        "timestep": ((1,), (2,), (2,)),
    }
    start = time.perf_counter()
    engine = build_serialized_engine(library, out / "transformer.onnx", shapes, compute_capabilities=("8.9",), opt_level=3)
    with open(out / "transformer.engine", "wb") as f:
        f.write(engine.data)  # IHostMemory supports the buffer protocol: no copy
    return {"build_s": time.perf_counter() - start, "engine_gb": (out / "transformer.engine").stat().st_size / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--build", action="store_true")
    parser.add_argument("--phase", choices=["export", "build"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        result = (export if args.phase == "export" else build)(args.out)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(json.dumps(result))
        return 0
    report = {}
    for phase in ["export"] + (["build"] if args.build else []):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, str(args.out), "--phase", phase], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        report[phase] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
