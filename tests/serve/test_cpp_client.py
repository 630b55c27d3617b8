"""The C++ client in examples/cpp/ (CMake, libcurl, nlohmann-json), built and run against `latentrt serve`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

SOURCE = Path(__file__).resolve().parents[2] / "examples" / "cpp"
INCLUDE_DIRS = [Path("/usr/include"), Path("/usr/local/include")]


def _missing() -> list[str]:
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    for header, package in (("curl/curl.h", "libcurl4-openssl-dev"), ("nlohmann/json.hpp", "nlohmann-json3-dev")):
        if not any((d / header).exists() or any(d.glob(f"*/{header}")) for d in INCLUDE_DIRS):
            missing.append(package)
    return missing


pytestmark = pytest.mark.skipif(bool(_missing()), reason=f"the C++ client needs {', '.join(_missing())} (apt-get install cmake g++ libcurl4-openssl-dev nlohmann-json3-dev)")


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cpp-build")
    subprocess.run(["cmake", "-S", str(SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    return build / "latentrt_client"


def read_ppm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    magic, width, height, maxval, pixels = data.split(maxsplit=4)
    assert magic == b"P6" and maxval == b"255"
    return np.frombuffer(pixels, np.uint8).reshape(int(height), int(width), 3)


def test_cpp_image_equals_the_python_clients(client, demo_server, infer, tmp_path):
    out = tmp_path / "out.ppm"
    args = ["--prompt", "left: small orange triangle on a black background", "--seed", "21", "--steps", "4", "--guidance", "3", "--height", "48"]
    result = subprocess.run([str(client), "--url", f"http://{demo_server.http}", "--model", "latentrt", *args, "-o", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    image = read_ppm(out)
    expected, _ = infer(demo_server.http, "latentrt", {"prompt": ["left: small orange triangle on a black background"], "seed": [21],
                                                       "num_inference_steps": [4], "guidance_scale": [3.0], "height": [48]})
    assert image.shape == (48, 64, 3)
    np.testing.assert_array_equal(image, expected[0])
    lines = result.stdout.splitlines()
    assert lines[0] == f"wrote {out} (64x48)" and lines[1].startswith("seed 21, 4 steps, batch of ")
    timings = dict(line.strip().split(": ") for line in lines[2:])
    assert set(timings) == {"text_encoding_ms", "denoising_ms", "vae_decode_ms", "pipeline_ms", "round_trip_ms"}
    assert float(timings["round_trip_ms"]) >= float(timings["pipeline_ms"]) > float(timings["denoising_ms"]) > 0


def test_cpp_client_reports_a_refusal(client, demo_server, tmp_path):
    result = subprocess.run([str(client), "--url", f"http://{demo_server.http}", "--prompt", "x", "--width", "100", "-o", str(tmp_path / "x.ppm")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: the server answered 400: width 100 is not valid for this bundle: it must be a multiple of 8 between 16 and 64; "
        "the nearest valid width is 64"
    )
    assert not (tmp_path / "x.ppm").exists()
