"""`latentrt bench`: the same generation through each backend, alternated in one run.

Each backend runs in its own worker process (`python -m latentrt.bench.worker`), so its peak
resident memory is its own; the parent sends the same request to each worker in turn, repetition
after repetition, so drift on the machine hits every backend alike.
"""

from latentrt.bench.runner import BenchConfig, BenchReport, run_bench

__all__ = ["BenchConfig", "BenchReport", "run_bench"]
