"""The package's exceptions: one base class and a few specific kinds.

Every message says where the problem is, what was received, what was expected and how to fix it.
"""


class LatentRTError(Exception):
    """Base class of every error latentrt raises on purpose."""


class InputError(LatentRTError, ValueError):
    """A user-supplied argument, path or file is not what latentrt can use."""


class BundleError(LatentRTError):
    """A bundle is missing, corrupt, from a newer schema, or its files do not match the manifest."""


class ExportError(LatentRTError):
    """An export failed, or its ONNX model disagrees with PyTorch beyond the tolerance."""


class BuildError(LatentRTError):
    """A TensorRT parser or builder rejected a network or an optimization profile."""
