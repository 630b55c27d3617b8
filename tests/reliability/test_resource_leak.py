"""Resource leaks: loading a bundle again and again (a server reloading bundles) keeps no file
descriptor, in particular none on the deleted temporary copy ONNX Runtime's rewrite is loaded from."""

from __future__ import annotations

import gc
import os

import pytest

from latentrt.runtime.pipeline import Pipeline

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc/self/fd (Linux)")


def _open_files() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed meanwhile (the listing's own fd)
            pass
    return found


def test_twenty_loads_keep_no_file_descriptor(tiny_sd3_bundle):
    for engine in Pipeline.load(tiny_sd3_bundle).engines.values():  # first load: ONNX Runtime's one-time set-up
        engine.close()
    gc.collect()
    before = _open_files()
    for _ in range(20):
        pipe = Pipeline.load(tiny_sd3_bundle)
        assert pipe("a cat", num_inference_steps=1, height=64, width=64).pixels.shape == (1, 64, 64, 3)
        for engine in pipe.engines.values():
            engine.close()
        del pipe
    gc.collect()
    after = _open_files()
    # (the export that made the bundle may hold some of its own, before this test)
    assert [f for f in after if f.endswith("(deleted)") and f not in before] == []
    assert len(after) <= len(before), sorted(set(after) - set(before))
