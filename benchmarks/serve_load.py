"""Load on `latentrt serve` (the real tritonserver): throughput and latency with 1, 4 and 16 concurrent
clients, dynamic batching against `--max-batch 1`, and the server's memory over a long run.

    python benchmarks/serve_load.py BUNDLE [--requests 64] [--concurrency 1,4,16] [--soak 500] [--threads T] [--json FILE]

BUNDLE is the demo bundle (`make demo` writes out/demo-bundle). Every request is one image of the demo's
default size with a distinct prompt and seed (16 steps, guidance 3.0, as `make demo`); clients are
threads of this process, each with its own tritonclient HTTP connection (binary tensors). Two servers run
side by side, the default dynamic batching and `--max-batch 1`, each warmed up with 8 requests; at each
concurrency they take turns in `--rounds` rounds of `--requests / --rounds` requests (at least two per
client), so that the machine's speed drifting during the run weighs on both alike. The batching server's
RSS (tritonserver and its stub processes, summed) is read before and after `--soak` more requests at
concurrency 4. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from latentrt.serve.repository import ModelConfig
from latentrt.serve.server import ServerConfig, TritonServer, port_free

PROMPTS = [f"a {size} {colour} {shape} {where}" for size in ("large", "small") for colour in ("red", "blue", "green", "yellow")
           for shape in ("circle", "square", "triangle") for where in ("on the left", "at the top", "in the centre")]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def server_memory_mb(server: TritonServer) -> dict[str, float]:
    """RSS and its anonymous part (heap: what a leak grows) of tritonserver and every process it
    started (its stubs), summed, in MB."""
    total = {"VmRSS": 0, "RssAnon": 0}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
        except OSError:
            continue
        if int(proc.name) == server.process.pid or f"PPid:\t{server.process.pid}\n" in status:
            for line in status.splitlines():
                key = line.split(":")[0]
                if key in total:
                    total[key] += int(line.split()[1])
    return {"rss_mb": total["VmRSS"] / 1024, "anon_mb": total["RssAnon"] / 1024}


class Load:
    def __init__(self, url: str, steps: int, guidance: float) -> None:
        self.url, self.steps, self.guidance = url, steps, guidance
        self.local = threading.local()
        self.counter = 0
        self.lock = threading.Lock()

    def one(self, _=None) -> tuple[float, int]:
        import tritonclient.http as client

        if not hasattr(self.local, "client"):
            self.local.client = client.InferenceServerClient(self.url, connection_timeout=300, network_timeout=300)
        with self.lock:
            i = self.counter
            self.counter += 1
        rows = {"prompt": (np.array([[PROMPTS[i % len(PROMPTS)].encode()]], dtype=object), "BYTES"),
                "seed": (np.array([[i]], np.int64), "INT64"), "num_inference_steps": (np.array([[self.steps]], np.int32), "INT32"),
                "guidance_scale": (np.array([[self.guidance]], np.float32), "FP32")}
        inputs = []
        for name, (value, datatype) in rows.items():
            t = client.InferInput(name, list(value.shape), datatype)
            t.set_data_from_numpy(value)
            inputs.append(t)
        start = time.perf_counter()
        result = self.local.client.infer("latentrt", inputs, outputs=[client.InferRequestedOutput("image"), client.InferRequestedOutput("timings", binary_data=False)])
        latency = time.perf_counter() - start
        return latency, json.loads(result.as_numpy("timings")[0, 0])["batch_size"]

    def run(self, requests: int, concurrency: int) -> dict:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(self.one, range(requests)))
        return summary(concurrency, time.perf_counter() - start, [r[0] for r in results], [r[1] for r in results])


def summary(concurrency: int, seconds: float, latencies: list[float], batches: list[int]) -> dict:
    latencies = sorted(latencies)
    return {
        "concurrency": concurrency, "requests": len(latencies), "seconds": seconds, "images_per_s": len(latencies) / seconds,
        "p50_ms": 1e3 * statistics.median(latencies), "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "mean_batch": statistics.mean(batches), "latencies": latencies, "batches": batches,
    }


def merge(runs: list[dict]) -> dict:
    return summary(runs[0]["concurrency"], sum(r["seconds"] for r in runs), [x for r in runs for x in r["latencies"]],
                   [x for r in runs for x in r["batches"]])


def free_ports() -> tuple[int, int, int]:
    port = 18500
    while not all(port_free("127.0.0.1", port + k) for k in range(3)):
        port += 3
    return port, port + 1, port + 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--soak", type=int, default=500)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per model instance (0: its choice).")
    parser.add_argument("--rounds", type=int, default=4, help="Turns each server takes per concurrency level.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    report = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "steps": args.steps, "threads": args.threads, "load_average_before": os.getloadavg(), "setups": {}}
    setups = {"dynamic batching": None, "--max-batch 1": 1}
    with contextlib.ExitStack() as stack:
        servers, loads = {}, {}
        for label, max_batch in setups.items():
            http, grpc, metrics = free_ports()
            config = ServerConfig(http_port=http, grpc_port=grpc, metrics_port=metrics)
            servers[label] = stack.enter_context(TritonServer.for_bundle(args.bundle, ModelConfig(max_batch=max_batch, threads=args.threads), config))
            loads[label] = Load(f"127.0.0.1:{http}", args.steps, args.guidance)
            loads[label].run(8, 4)  # warm-up: the first calls of each batch size
            report["setups"][label] = {"max_batch": servers[label].max_batch_size, "rows": []}
        # The two servers take turns (idle, one costs nothing), in rounds, so that a change in the
        # machine's speed during the run weighs on both alike.
        for c in levels:
            parts = {label: [] for label in setups}
            for _ in range(args.rounds):
                for label in setups:
                    parts[label].append(loads[label].run(max(2 * c, args.requests // args.rounds), c))
            for label, runs in parts.items():
                report["setups"][label]["rows"].append(merge(runs))
        if args.soak:
            server, load = servers["dynamic batching"], loads["dynamic batching"]
            before = server_memory_mb(server)
            soak = load.run(args.soak, 4)
            after = server_memory_mb(server)
            report["setups"]["dynamic batching"]["soak"] = {
                "requests": args.soak, "before": before, "after": after, "images_per_s": soak["images_per_s"],
                "rss_growth_pct": 100 * (after["rss_mb"] - before["rss_mb"]) / before["rss_mb"],
                "anon_growth_pct": 100 * (after["anon_mb"] - before["anon_mb"]) / before["anon_mb"]}
    report["load_average_after"] = os.getloadavg()
    print(f"\n{report['machine']}; demo bundle, {args.steps} steps, one image per request, {args.requests} requests per row, "
          f"ONNX Runtime threads {args.threads or 'default'}; "
          f"load average {report['load_average_before'][0]:.1f} before, {report['load_average_after'][0]:.1f} after\n")
    print("| server | clients | images/s | p50 latency | p99 latency | mean batch |")
    print("|---|---|---|---|---|---|")
    for label, setup in report["setups"].items():
        for r in setup["rows"]:
            print(f"| {label} (max {setup['max_batch']}) | {r['concurrency']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {r['mean_batch']:.2f} |")
    batched, single = (report["setups"][k]["rows"] for k in ("dynamic batching", "--max-batch 1"))
    print("\n| clients | gain of dynamic batching (images/s) |\n|---|---|")
    for b, s in zip(batched, single):
        print(f"| {b['concurrency']} | {b['images_per_s'] / s['images_per_s']:.2f}x |")
    soak = report["setups"]["dynamic batching"].get("soak")
    if soak:
        b, a = soak["before"], soak["after"]
        print(f"\nserver memory over {soak['requests']} more requests: RSS {b['rss_mb']:.0f} -> {a['rss_mb']:.0f} MB "
              f"({soak['rss_growth_pct']:+.1f}%), anonymous (heap) {b['anon_mb']:.0f} -> {a['anon_mb']:.0f} MB ({soak['anon_growth_pct']:+.1f}%)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
