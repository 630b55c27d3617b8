"""Requests to images: the serving logic, independent of the server that carries the requests.

A request holds one or more rows, one image each. Its tensors (KServe v2, batch dimension first):

| input               | datatype | shape  | default                                          |
|---------------------|----------|--------|--------------------------------------------------|
| prompt              | BYTES    | [n, 1] | required (UTF-8)                                 |
| negative_prompt     | BYTES    | [n, 1] | the family's (as `Pipeline.__call__` with None)  |
| seed                | INT64    | [n, 1] | drawn by the server and returned in `timings`    |
| num_inference_steps | INT32    | [n, 1] | the manifest's                                   |
| guidance_scale      | FP32     | [n, 1] | the manifest's                                   |
| height, width       | INT32    | [n, 1] | the manifest's                                   |

Outputs: `image` UINT8 [n, height, width, 3] and `timings` BYTES [n, 1], one JSON object per row
(the seed used, how many images shared the pipeline call, and its stage times in milliseconds).

`RequestParser` turns one request's tensors into `Row`s or raises `InputError`; `run_batch` runs the
rows of several requests, one pipeline call per group of rows that share steps, guidance, size and
whether a negative prompt was given (rows that differ are never mixed), and hands each request its
images or the error of its group. Row `i`'s initial latents are drawn from its own seed exactly as
`Pipeline.__call__(prompt, seed=seed)` draws them, so a request that runs alone gives the Python API's
image bit for bit; batched with others, ONNX Runtime's batched kernels round differently (<= 2/255).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from latentrt.bundle.manifest import Manifest
from latentrt.errors import InputError
from latentrt.runtime.pipeline import MAX_INFERENCE_STEPS

#: input name -> (KServe datatype, numpy dtype of its values)
INPUTS: dict[str, tuple[str, type]] = {
    "prompt": ("BYTES", np.object_),
    "negative_prompt": ("BYTES", np.object_),
    "seed": ("INT64", np.int64),
    "num_inference_steps": ("INT32", np.int32),
    "guidance_scale": ("FP32", np.float32),
    "height": ("INT32", np.int32),
    "width": ("INT32", np.int32),
}
#: output name -> KServe datatype
OUTPUTS: dict[str, str] = {"image": "UINT8", "timings": "BYTES"}
REQUIRED = ("prompt",)
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """What the server accepts beyond what the bundle allows.

    Attributes:
        max_steps: the most denoising steps one row may ask for (a request's cost grows with them).
        max_prompt_bytes: the longest prompt or negative prompt, in UTF-8 bytes (text encoders
            truncate at 77-512 tokens; longer input only costs tokenization and bandwidth).
    """

    max_steps: int = 100
    max_prompt_bytes: int = 4096

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise InputError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_prompt_bytes < 1:
            raise InputError(f"max_prompt_bytes must be >= 1, got {self.max_prompt_bytes}")


@dataclass(frozen=True)
class Row:
    """One image to generate: a `Pipeline.__call__` argument set for a single prompt."""

    prompt: str
    negative_prompt: str | None
    seed: int
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int

    @property
    def group(self) -> tuple:
        """Rows with equal groups run in one pipeline call."""
        return (self.num_inference_steps, self.guidance_scale, self.height, self.width, self.negative_prompt is None)


@dataclass(frozen=True)
class Result:
    """One row's image, uint8 [height, width, 3], and what its pipeline call reported."""

    image: np.ndarray
    timings: dict

    def timings_json(self) -> bytes:
        return json.dumps(self.timings, sort_keys=True).encode()


class RequestParser:
    """Checks one request's tensors against the bundle and the limits, and fills in the defaults.

    Messages match the Python API's where it checks the same thing (steps < 1, a size outside the
    bundle's ranges), so a client sees what `Pipeline.__call__` would have raised.
    """

    def __init__(self, manifest: Manifest, limits: Limits = Limits()) -> None:
        self.defaults = manifest.defaults
        self.limits = limits
        self.vae_scale = manifest.latent.vae_scale_factor
        axes = manifest.components["vae_decoder"].axes  # NCHW latents in every family
        self.size_axes = {"height": axes["latent_height"], "width": axes["latent_width"]}
        if self.defaults.num_inference_steps > limits.max_steps:
            raise InputError(
                f"the bundle's default of {self.defaults.num_inference_steps} steps is above max_steps {limits.max_steps}: "
                f"requests without num_inference_steps would all fail; raise max_steps (--max-steps)"
            )

    def parse(self, tensors: Mapping[str, np.ndarray | None]) -> list[Row]:
        """`{input name: array [n, 1] or None}` -> n rows; raises InputError naming the bad input."""
        unknown = sorted(set(tensors) - set(INPUTS))
        if unknown:
            raise InputError(f"unknown input(s) {unknown}; this model takes {', '.join(INPUTS)}")
        for name in REQUIRED:
            if tensors.get(name) is None:
                raise InputError(f"input {name!r} is missing: send it as {INPUTS[name][0]} [n, 1], one row per image")
        columns = {name: self._column(name, value) for name, value in tensors.items() if value is not None}
        sizes = {name: len(col) for name, col in columns.items()}
        n = sizes["prompt"]
        if n == 0 or any(size != n for size in sizes.values()):
            raise InputError(f"every input needs the same number of rows (one per image, at least one), got {sizes}")

        d = self.defaults
        steps = [int(s) for s in columns.get("num_inference_steps", [d.num_inference_steps] * n)]
        # FP32 on the wire: 3.1 arrives as 3.0999999; its shortest decimal (3.1) is what the client meant.
        guidance = [float(str(g)) for g in columns["guidance_scale"]] if "guidance_scale" in columns else [d.guidance_scale] * n
        heights = [int(h) for h in columns.get("height", [d.height] * n)]
        widths = [int(w) for w in columns.get("width", [d.width] * n)]
        seeds = [int(s) for s in columns["seed"]] if "seed" in columns else [secrets.randbelow(MAX_SEED + 1) for _ in range(n)]
        if len(set(zip(heights, widths))) > 1:
            raise InputError(
                f"rows of one request must share height and width (its `image` output is one [n, height, width, 3] "
                f"tensor), got {sorted(set(zip(heights, widths)))}; send rows of other sizes as separate requests"
            )
        for s in steps:
            if not 1 <= s <= MAX_INFERENCE_STEPS:
                raise InputError(f"num_inference_steps must be >= 1 and <= {MAX_INFERENCE_STEPS}, got {s}")  # Pipeline.__call__'s message
            if s > self.limits.max_steps:
                raise InputError(
                    f"num_inference_steps {s} is above this server's limit of {self.limits.max_steps}; "
                    f"ask for fewer steps or start the server with a higher --max-steps"
                )
        for g in guidance:
            if not math.isfinite(g):
                raise InputError(f"guidance_scale must be a finite number, got {g}")
        for seed in seeds:
            if seed < 0:
                raise InputError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
        self._check_size(heights[0], widths[0])
        prompts = [self._text("prompt", v) for v in columns["prompt"]]
        negatives = [self._text("negative_prompt", v) for v in columns["negative_prompt"]] if "negative_prompt" in columns else [None] * n
        return [Row(*fields) for fields in zip(prompts, negatives, seeds, steps, guidance, heights, widths)]

    def _column(self, name: str, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value)
        datatype, dtype = INPUTS[name]
        if value.dtype != dtype and not (dtype is np.object_ and value.dtype.kind in "SOU"):
            raise InputError(f"input {name!r} has dtype {value.dtype}, expected {datatype}")
        if value.ndim != 2 or value.shape[1] != 1:
            raise InputError(f"input {name!r} has shape {list(value.shape)}, expected [n, 1] (one row per image)")
        return value[:, 0]

    def _text(self, name: str, value) -> str:
        raw = value if isinstance(value, bytes) else str(value).encode()
        if len(raw) > self.limits.max_prompt_bytes:
            raise InputError(
                f"{name} is {len(raw)} bytes long; this server accepts at most {self.limits.max_prompt_bytes} "
                f"(the text encoders read only the first tokens): shorten it"
            )
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{name} is not valid UTF-8 ({err.reason} at byte {err.start}); send UTF-8 text") from err

    def _check_size(self, height: int, width: int) -> None:
        """The Python API's size check (runtime/pipeline.py `_latent_size`), with the same message."""
        vae = self.vae_scale
        for what, pixels in (("height", height), ("width", width)):
            axis = self.size_axes[what]
            step = vae * axis.multiple_of
            if pixels % step or not axis.contains(pixels // vae):
                nearest = min(max(round(pixels / step) * step, axis.min * vae), axis.max * vae)
                raise InputError(
                    f"{what} {pixels} is not valid for this bundle: it must be a multiple of {step} between "
                    f"{axis.min * vae} and {axis.max * vae}; the nearest valid {what} is {nearest}"
                )


def generate(pipeline, rows: Sequence[Row]) -> list[Result]:
    """One pipeline call for rows of one group (same steps, guidance, size, negative given or not)."""
    first = rows[0]
    if any(r.group != first.group for r in rows):
        raise InputError("generate() takes rows of one group; split them with run_batch()")
    f = pipeline.manifest.latent.vae_scale_factor
    shape = pipeline.family.latent_shape(1, first.height // f, first.width // f)
    # The draw `Pipeline.__call__(prompt, seed=seed)` makes for a single image, row by row.
    latents = np.concatenate([np.random.default_rng(r.seed).standard_normal(shape, dtype=np.float32) for r in rows])
    out = pipeline(
        [r.prompt for r in rows],
        negative_prompt=None if first.negative_prompt is None else [r.negative_prompt for r in rows],
        num_inference_steps=first.num_inference_steps,
        guidance_scale=first.guidance_scale,
        height=first.height,
        width=first.width,
        latents=latents,
    )
    t = out.timings
    shared = {
        "batch_size": len(rows),
        "num_inference_steps": first.num_inference_steps,
        "text_encoding_ms": 1e3 * t["text_encoding"],
        "denoising_ms": 1e3 * sum(t["denoising_steps"]),
        "vae_decode_ms": 1e3 * t["vae_decode"],
        "pipeline_ms": 1e3 * t["total"],
    }
    # The pipeline's own 8-bit rounding (its PIL images), so a row equals `out.images[i]` of the Python API.
    return [Result(np.asarray(image), {**shared, "seed": r.seed}) for image, r in zip(out.images, rows)]


def run_batch(pipeline, requests: Sequence[Sequence[Row]]) -> list[list[Result] | Exception]:
    """The rows of several requests: one `generate` call per group, results handed back per request.

    Returns, for each request, its rows' results in order, or the exception of a group it had rows
    in (its neighbours in other groups are unaffected).
    """
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, rows in enumerate(requests):
        for j, row in enumerate(rows):
            groups.setdefault(row.group, []).append((i, j))
    results: list[list[Result | None] | Exception] = [[None] * len(rows) for rows in requests]
    for members in groups.values():
        alive = [(i, j) for i, j in members if not isinstance(results[i], Exception)]
        if not alive:
            continue
        try:
            images = generate(pipeline, [requests[i][j] for i, j in alive])
        except Exception as err:  # noqa: BLE001 - one group's failure must not fail the others
            for i, _ in alive:
                results[i] = err
            continue
        for (i, j), result in zip(alive, images):
            if not isinstance(results[i], Exception):
                results[i][j] = result
    return results
