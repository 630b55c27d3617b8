"""latentrt: export diffusers text-to-image pipelines to ONNX bundles, build TensorRT engines, run them without torch."""

from latentrt._version import __version__
from latentrt.errors import BuildError, BundleError, ExportError, InputError, LatentRTError

__all__ = ["__version__", "LatentRTError", "InputError", "BundleError", "ExportError", "BuildError", "Pipeline", "PipelineOutput"]


def __getattr__(name: str):
    # The pipeline pulls in numpy and onnxruntime; keep `import latentrt` cheap for the CLI.
    if name in ("Pipeline", "PipelineOutput"):
        from latentrt.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'latentrt' has no attribute {name!r}")
