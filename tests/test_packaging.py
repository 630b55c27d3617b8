"""The wheel installs `latentrt` and its stage subpackages, and nothing as a bare top-level module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools' build/ folder would otherwise land in (and be reused from) the checkout.
    source = shutil.copytree(
        ROOT, tmp_path_factory.mktemp("src") / "latentrt", ignore=shutil.ignore_patterns(".venv", ".git", "build", "out", "*.egg-info")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("latentrt-*.whl")
    return path


def test_wheel_contains_only_the_latentrt_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"latentrt"}
    for sub in ("export", "runtime", "calibration", "models", "cli"):
        assert f"latentrt/{sub}/__init__.py" in names
    assert "latentrt/py.typed" in names
    assert not any(n.startswith("latentrt/tests/") for n in names)


def test_installed_wheel_imports_runtime(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    script = "import latentrt.runtime.pipeline as p, latentrt; print(p.__file__); print(latentrt.__version__)"
    # -I: isolated mode, so neither the checkout nor the editable install is on the path.
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {script}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    module_file, version = result.stdout.split()
    assert Path(module_file).is_relative_to(target)
    for bare in ("export", "runtime", "models", "calibration"):
        assert not (target / bare).exists()
