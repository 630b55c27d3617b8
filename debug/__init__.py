"""Find the layer that breaks: per-layer accuracy of a bundle's component against its reference.

    from latentrt.debug import DebugConfig, debug_bundle, plot_report

    report = debug_bundle("out/demo-int8", DebugConfig(steps=16))
    print(report.first_over_tolerance, report.suggestion.command)
    plot_report(report, "drift.png")

Modules by step: `record` (the component's real inputs from a generation), `graphs` (the two graphs
and the tensors they share, in topological order), `compare` (Polygraphy's runners and comparator
with every tensor marked as an output), `report` (the JSON report and its suggestion), `plot`
(error against depth, PNG; needs matplotlib), `run` (the entry point). Needs `polygraphy` and
`onnx-graphsurgeon` (the `debug` extra).
"""

from latentrt.debug.plot import plot_report
from latentrt.debug.record import record_inputs
from latentrt.debug.report import DebugReport, LayerReport, Suggestion
from latentrt.debug.run import DEFAULT_TOLERANCE, DebugConfig, debug_bundle

__all__ = ["DEFAULT_TOLERANCE", "DebugConfig", "DebugReport", "LayerReport", "Suggestion", "debug_bundle", "plot_report", "record_inputs"]
