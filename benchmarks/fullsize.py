"""Export (and optionally build) a full-size pipeline on this machine, measuring every phase.

    python benchmarks/fullsize.py flux-dev --work /tmp/fullsize [--precision fp16] [--build] [--keep] [--json out.json]

1. Writes the published FLUX.1-dev or SD3.5-large configs with random bf16 weights, shard by shard
   (`latentrt.models.fullsize`), unless WORK/source-NAME already holds them.
2. Runs `latentrt.export.pipeline.export_pipeline` in a child process and samples the resident
   memory of the whole process tree every 0.2 s; the export's progress events split the time and
   the peak memory into phases (trace + graph passes, fp32-island ranges, conversion, write,
   validation) per component.
3. With --build, builds the transformer's TensorRT-RTX engine the same way (`latentrt build`).
4. Prints a table (with the CPU) and deletes the multi-GB outputs unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

EXPORT = """
import json, sys, time
from latentrt.export.pipeline import ExportConfig, export_pipeline
def progress(step):
    print(json.dumps({"t": time.time(), "phase": step}), flush=True)
progress("load")
export_pipeline(sys.argv[1], sys.argv[2], ExportConfig(precision=sys.argv[3], overwrite=True), progress=progress)
progress("done")
"""

BUILD = """
import json, sys, time
from latentrt.engines import BuildConfig, build_engines
print(json.dumps({"t": time.time(), "phase": "build transformer"}), flush=True)
build_engines(sys.argv[1], BuildConfig(target="tensorrt-rtx", components=("transformer",), **json.loads(sys.argv[2])))
print(json.dumps({"t": time.time(), "phase": "done"}), flush=True)
"""


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measured(script: str, *args: str, check: bool = True, limit: float | None = None) -> tuple[list[dict], int]:
    """Run `script` in a child Python; returns its phases with wall seconds and peak tree RSS (the
    last one cut where the child ended), and its exit code (raises on failure when `check`). With
    `limit` (bytes), the child is killed when its tree's RSS exceeds it (exit code -9)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    phases = [{"phase": "start", "t": time.time(), "peak_rss": 0}]
    lock = threading.Lock()

    def read() -> None:
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            with lock:
                last = phases[-1]
                print(f"  {last['phase']}: {event['t'] - last['t']:.0f} s, peak {last['peak_rss'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
                phases.append({"phase": event["phase"], "t": event["t"], "peak_rss": 0})

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        rss = tree_rss(proc.pid)
        with lock:
            phases[-1]["peak_rss"] = max(phases[-1]["peak_rss"], rss)
        if limit is not None and rss > limit:
            print(f"  killed: the process tree's RSS reached {rss / 1e9:.2f} GB (limit {limit / 1e9:.1f} GB)", file=sys.stderr, flush=True)
            proc.kill()
            proc.wait()
            break
        time.sleep(0.2)
    reader.join()
    if proc.returncode and check:
        raise SystemExit(f"the child process failed with exit code {proc.returncode}")
    phases.append({"phase": "end", "t": time.time()})
    for a, b in zip(phases, phases[1:]):
        a["seconds"] = b["t"] - a["t"]
    return [p for p in phases if "seconds" in p and p["phase"] not in ("start", "done")], proc.returncode


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=["flux-dev", "sd35-large"])
    parser.add_argument("--work", type=Path, required=True, help="a folder with room for the source and the bundle (~70 GB for flux-dev fp16)")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--build", action="store_true", help="also build the transformer's TensorRT-RTX engine")
    parser.add_argument("--build-config", default='{"compute_capabilities": ["8.9"], "batch": [1, 1, 1]}')
    parser.add_argument("--build-memory-limit", type=float, default=20.0, help="GB of RSS at which the build is stopped (the machine has to survive it)")
    parser.add_argument("--keep", action="store_true", help="keep the source and the bundle")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    source, bundle = args.work / f"source-{args.name}", args.work / f"bundle-{args.name}-{args.precision}"
    report = {"pipeline": args.name, "precision": args.precision, "cpu": cpu_name(), "cores": os.cpu_count()}
    if not (source / "model_index.json").is_file():
        start = time.time()
        from latentrt.models.fullsize import write_fullsize

        write_fullsize(args.name, source)
        report["write_source_seconds"] = time.time() - start
    report["source_bytes"] = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
    report["export"], _ = measured(EXPORT, str(source), str(bundle), args.precision)
    report["bundle_bytes"] = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    if args.build:
        report["build"], report["build_exit_code"] = measured(BUILD, str(bundle), args.build_config, check=False, limit=args.build_memory_limit * 1e9)

    print(f"\n{args.name} ({args.precision}), {report['cpu']}, {report['cores']} cores")
    print("| phase | wall | peak RSS (process tree) |\n|---|---|---|")
    for phase in report["export"] + report.get("build", []):
        print(f"| {phase['phase']} | {phase['seconds']:.0f} s | {phase['peak_rss'] / 1e9:.2f} GB |")
    total = sum(p["seconds"] for p in report["export"])
    peak = max(p["peak_rss"] for p in report["export"])
    print(f"| export total | {total / 60:.1f} min | {peak / 1e9:.2f} GB |")
    print(f"source {report['source_bytes'] / 1e9:.1f} GB, bundle {report['bundle_bytes'] / 1e9:.1f} GB")
    if report.get("build_exit_code"):
        print(f"the build failed with exit code {report['build_exit_code']} (-9: killed, e.g. out of memory)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(bundle, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
