"""`latentrt debug` on the demo model with a planted int8-sensitive layer: find it, exclude it, measure PSNR.

    python benchmarks/debug_cases.py [--out out/debug-case] [--plot docs/debug-int8-outlier.png]

1. Copy the demo pipeline (models/demo/pipeline) and plant an outlier channel in the last block's
   attention output (`latentrt.debug.cases.plant_attention_outlier`, factor 100: the same function,
   fp32 images identical to the demo's up to float rounding); export it.
2. Calibrate int8 as the README does (32 calibration prompts x 16 steps, guidance 3).
3. `debug_bundle` on it (16 steps): the first layer over tolerance and the suggested `--exclude`.
4. Recalibrate with the suggested patterns; PSNR of both int8 bundles against the fp32 one on the
   64 `latentrt eval` prompts (disjoint from the calibration prompts).
Prints the numbers and writes them as JSON next to the bundles.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from latentrt.calibration.prompts import load_prompts
from latentrt.calibration.quantize import QuantizeConfig, quantize_bundle
from latentrt.debug import DebugConfig, debug_bundle, plot_report
from latentrt.debug.cases import plant_attention_outlier
from latentrt.export.pipeline import ExportConfig, export_pipeline
from latentrt.models.demo.bundle_eval import evaluate_bundle
from latentrt.runtime.backends.cpu import cpu_info

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "models" / "demo" / "prompts" / "calibration.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "debug-case")
    parser.add_argument("--plot", type=Path, default=None, help="Also draw the report here (PNG).")
    parser.add_argument("--factor", type=float, default=100.0)
    args = parser.parse_args()
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    timings = {}
    t = time.perf_counter()
    source = shutil.copytree(ROOT / "models" / "demo" / "pipeline", out / "source")
    planted = plant_attention_outlier(source, factor=args.factor)
    export_pipeline(source, out / "fp32", ExportConfig(max_sequence_length=0))
    timings["export_s"] = time.perf_counter() - t

    prompts = load_prompts(PROMPTS)
    base = dict(precision="int8", steps=16, guidance_scale=3.0)
    t = time.perf_counter()
    quantize_bundle(out / "fp32", out / "int8", QuantizeConfig(**base), prompts=prompts)
    timings["calibrate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    report = debug_bundle(out / "int8", DebugConfig(steps=16, guidance_scale=3.0))
    timings["debug_s"] = time.perf_counter() - t
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    if args.plot:
        plot_report(report, args.plot, title=f"demo transformer, int8 with an outlier planted in {planted}\n(latentrt debug, 16 steps)")

    quantize_bundle(out / "fp32", out / "int8-fixed", QuantizeConfig(**base, exclude=report.suggestion.exclude), prompts=prompts)
    psnr = {}
    for name in ("int8", "int8-fixed"):
        result = evaluate_bundle(out / name, reference=out / "fp32")
        psnr[name] = {"mean_db": result["psnr_db_mean"], "min_db": min(result["psnr_db"]), "accuracy": result["quantized"]["overall"]}
    fixed = debug_bundle(out / "int8-fixed", DebugConfig(steps=16, guidance_scale=3.0))
    summary = {
        "machine": f"{cpu_info().name} ({platform.machine()})",
        "planted": planted,
        "first_over_tolerance": report.first_over_tolerance,
        "suggested_exclude": list(report.suggestion.exclude),
        "planted_layer_rel_l2": report.layer(planted).rel_l2,
        "planted_layer_rel_l2_after": fixed.layer(planted).rel_l2,
        "output_rel_l2": report.layers[-1].rel_l2,
        "output_rel_l2_after": fixed.layers[-1].rel_l2,
        "layers_compared": len(report.layers),
        "psnr": psnr,
        **timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
