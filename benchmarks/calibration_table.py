"""int8 / fp8 calibration of the demo model per method, with and without SmoothQuant: PSNR and accuracy.

    python benchmarks/calibration_table.py BUNDLE [--precision int8] [--out DIR]

BUNDLE is the fp32 demo bundle (`make demo` writes out/demo-bundle). Calibration uses
models/demo/prompts/calibration.txt; the comparison uses `latentrt eval`'s prompt list (disjoint).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from latentrt.calibration.quantize import QuantizeConfig, quantize_bundle
from latentrt.models.demo import evaluate
from latentrt.models.demo.bundle_eval import evaluate_bundle

PROMPTS = Path(__file__).resolve().parents[1] / "models" / "demo" / "prompts" / "calibration.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--precision", default="int8", choices=["int8", "fp8"])
    parser.add_argument("--out", type=Path, default=None, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("percentile", "entropy", "minmax"):
            for alpha in (0.8, None):
                out = Path(tmp) / f"{method}-{alpha}"
                config = QuantizeConfig(
                    precision=args.precision, method=method, smoothquant_alpha=alpha, prompts_file=str(PROMPTS),
                    num_prompts=32, steps=evaluate.DEFAULT_STEPS, guidance_scale=evaluate.DEFAULT_GUIDANCE,
                )
                quantize_bundle(args.bundle, out, config)
                r = evaluate_bundle(out, reference=args.bundle)
                rows.append({
                    "method": method, "smoothquant_alpha": alpha, "psnr_db_mean": r["psnr_db_mean"], "psnr_db_min": min(r["psnr_db"]),
                    "reference_overall": r["reference"]["overall"], "quantized_overall": r["quantized"]["overall"],
                    "quantized_seen": r["quantized"]["seen"]["overall"], "quantized_held_out": r["quantized"]["held_out"]["overall"],
                })
    print(f"| method | SmoothQuant | mean PSNR (min) | accuracy fp32 | accuracy {args.precision} (seen / held-out) |")
    print("|---|---|---|---|---|")
    for r in rows:
        sq = "off" if r["smoothquant_alpha"] is None else f"alpha {r['smoothquant_alpha']}"
        print(f"| {r['method']} | {sq} | {r['psnr_db_mean']:.1f} dB ({r['psnr_db_min']:.1f}) | {r['reference_overall']:.3f} "
              f"| {r['quantized_overall']:.3f} ({r['quantized_seen']:.3f} / {r['quantized_held_out']:.3f}) |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
