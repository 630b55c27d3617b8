"""Optimization profiles: the min/opt/max shape of every engine input, from the manifest and a request.

A TensorRT engine runs only on input shapes inside the profile it was built with. A bundle's
manifest gives each component's dynamic axes with their valid ranges (`AxisRange`); the user asks
for what they will generate, in their own units, and this module turns that into per-axis sizes:

1. batch (`MIN:OPT:MAX` images per call). With classifier-free guidance the pipeline batches the
   negative prompts with the positive ones, so the text encoders and the denoiser see twice the
   images. With `guidance="cfg"` (the default) their batch axis gets `MIN : 2*OPT : 2*MAX`: the
   minimum stays `MIN` so that the same engine also serves unguided calls (guidance_scale <= 1).
   The VAE decoder always sees the images themselves: `MIN : OPT : MAX`. With `guidance="none"`
   every component gets `MIN : OPT : MAX`.
2. image size (`HxW` pixels at min, opt and max, or one static `HxW`): divided by the manifest's
   `latent.vae_scale_factor` to give the `latent_height` / `latent_width` axes; each pixel size must
   be a multiple of `vae_scale_factor * multiple_of` of those axes.
3. text length (`MIN:OPT:MAX` T5 tokens, for bundles with a T5 encoder): the T5 encoder's
   `sequence` axis, and the denoiser's text axis: SD3's `context_length` = CLIP length (77) + T5
   length, or PixArt's `sequence`. A minimum of 0 keeps SD3 prompts without T5 tokens
   (`max_sequence_length=0`) inside the denoiser's profile.

Axes nobody asked about keep the manifest's range. Because every input's shape is made from the
same per-axis sizes, a shared axis name (batch, say) has the same size in every input of a
component, in each of min, opt and max, which the builder requires. Every request is checked
against the manifest before any build starts; an `InputError` says what was asked, the valid range
and how to fix it.

Example:
    >>> request = ShapeRequest(batch=(1, 1, 2), image_size=parse_image_size("1024x1024"))  # doctest: +SKIP
    >>> profiles = resolve_profiles(manifest, request)  # doctest: +SKIP
    >>> profiles["transformer"].shapes["hidden_states"]  # doctest: +SKIP
    ((1, 16, 128, 128), (2, 16, 128, 128), (4, 16, 128, 128))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from latentrt.errors import BundleError, InputError
from latentrt.bundle.manifest import Component, Manifest

Guidance = Literal["cfg", "none"]
Role = Literal["text_encoder", "denoiser", "vae_decoder"]
Triple = tuple[int, int, int]
Size = tuple[int, int]
Shape = tuple[int, ...]

_LEVELS = ("min", "opt", "max")


# ---------------------------------------------------------------------------------------------
# Requests, in the user's units
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeRequest:
    """What the engines must cover, in the user's units; `None` keeps the manifest's range.

    Args:
        batch: images per call as (min, opt, max); see the module docstring for how it maps to
            each component's batch axis.
        image_size: ((h, w) at min, (h, w) at opt, (h, w) at max) in pixels. Use
            `parse_image_size("1024x1024")` for one static size.
        text_length: T5 tokens as (min, opt, max); min may be 0 (prompts with no T5 tokens).
        guidance: "cfg" when the pipeline may run classifier-free guidance (text encoders and the
            denoiser see up to 2x the images), "none" when it never does.
    """

    batch: Triple | None = None
    image_size: tuple[Size, Size, Size] | None = None
    text_length: Triple | None = None
    guidance: Guidance = "cfg"

    def __post_init__(self) -> None:
        if self.batch is not None:
            object.__setattr__(self, "batch", _check_triple("batch", self.batch, lowest=1))
        if self.text_length is not None:
            object.__setattr__(self, "text_length", _check_triple("text_length", self.text_length, lowest=0))
        if self.image_size is not None:
            object.__setattr__(self, "image_size", _check_sizes(self.image_size))
        if self.guidance not in ("cfg", "none"):
            raise InputError(f"guidance must be 'cfg' or 'none', got {self.guidance!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": list(self.batch) if self.batch else None,
            "image_size": [list(s) for s in self.image_size] if self.image_size else None,
            "text_length": list(self.text_length) if self.text_length else None,
            "guidance": self.guidance,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShapeRequest:
        return cls(**dict(d))


def _check_triple(what: str, value: Iterable[int], *, lowest: int) -> Triple:
    try:
        values = tuple(int(v) for v in value)
    except (TypeError, ValueError) as err:
        raise InputError(f"{what} must be three integers MIN:OPT:MAX, got {value!r}") from err
    if len(values) != 3:
        raise InputError(f"{what} must be three integers MIN:OPT:MAX, got {value!r}")
    lo, opt, hi = values
    if not (lowest <= lo <= opt <= hi):
        raise InputError(f"{what} {lo}:{opt}:{hi} must satisfy {lowest} <= MIN <= OPT <= MAX; reorder or fix the values")
    return values  # type: ignore[return-value]


def _check_sizes(value: Iterable[Iterable[int]]) -> tuple[Size, Size, Size]:
    try:
        sizes = tuple(tuple(int(v) for v in s) for s in value)
    except (TypeError, ValueError) as err:
        raise InputError(f"image_size must be three (height, width) pairs for min, opt and max, got {value!r}") from err
    if len(sizes) != 3 or any(len(s) != 2 for s in sizes):
        raise InputError(f"image_size must be three (height, width) pairs for min, opt and max, got {value!r}")
    for i, what in enumerate(("height", "width")):
        lo, opt, hi = (s[i] for s in sizes)
        if not (1 <= lo <= opt <= hi):
            raise InputError(
                f"image {what}s {lo}, {opt}, {hi} (min, opt, max) must satisfy 1 <= MIN <= OPT <= MAX; "
                f"got image_size {_format_sizes(sizes)}"
            )
    return sizes  # type: ignore[return-value]


def _format_sizes(sizes: Iterable[Size]) -> str:
    return ":".join(f"{h}x{w}" for h, w in sizes)


def parse_range(text: str, *, what: str = "range", lowest: int = 1) -> Triple:
    """ "1:2:4" -> (1, 2, 4); "2" -> (2, 2, 2) (a static size).

    Raises:
        InputError: not one integer or three colon-separated integers with MIN <= OPT <= MAX.
    """
    parts = str(text).strip().split(":")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise InputError(f"{what} {text!r} must be N or MIN:OPT:MAX, for example 1:1:4")
    try:
        values = [int(p) for p in parts]
    except ValueError as err:
        raise InputError(f"{what} {text!r} must be N or MIN:OPT:MAX of integers, for example 1:1:4") from err
    return _check_triple(what, values, lowest=lowest)


def parse_batch(text: str) -> Triple:
    """Images per call: "1:1:4" or "2" (static)."""
    return parse_range(text, what="batch", lowest=1)


def parse_text_length(text: str) -> Triple:
    """T5 tokens: "0:256:512" or "256" (static)."""
    return parse_range(text, what="text length", lowest=0)


def parse_image_size(text: str) -> tuple[Size, Size, Size]:
    """Pixels: "512x512:1024x1024:1536x1536", or one static "1024x768" (HxW), or "1024" (square).

    Raises:
        InputError: not one or three `HxW` sizes, or min/opt/max out of order.
    """
    parts = str(text).strip().lower().split(":")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise InputError(f"image size {text!r} must be HxW (static) or MINxMIN:OPTxOPT:MAXxMAX, for example 512x512:1024x1024:1024x1024")
    sizes = []
    for part in parts:
        hw = part.split("x")
        if len(hw) == 1:
            hw = hw * 2
        try:
            h, w = (int(v) for v in hw)
        except ValueError as err:
            raise InputError(f"image size {text!r}: {part!r} is not HxW with integer pixels, for example 1024x768") from err
        sizes.append((h, w))
    return _check_sizes(sizes)


# ---------------------------------------------------------------------------------------------
# Resolved profiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisProfile:
    """Sizes of one named axis at the profile's min, opt and max."""

    min: int
    opt: int
    max: int

    def as_tuple(self) -> Triple:
        return (self.min, self.opt, self.max)


@dataclass(frozen=True)
class ComponentProfile:
    """One component's optimization profile.

    Attributes:
        component: the manifest's component name.
        axes: every dynamic axis of the inputs with its min/opt/max size.
        shapes: per input, its (min, opt, max) shapes, as passed to `IOptimizationProfile.set_shape`.
    """

    component: str
    axes: dict[str, AxisProfile]
    shapes: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)

    def max_shapes(self) -> dict[str, Shape]:
        return {name: s[2] for name, s in self.shapes.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready and deterministic (sorted keys): part of the engine cache key."""
        return {
            "axes": {name: list(self.axes[name].as_tuple()) for name in sorted(self.axes)},
            "shapes": {name: {level: list(shape) for level, shape in zip(_LEVELS, self.shapes[name])} for name in sorted(self.shapes)},
        }

    @classmethod
    def from_dict(cls, component: str, d: Mapping[str, Any]) -> ComponentProfile:
        return cls(
            component=component,
            axes={name: AxisProfile(*v) for name, v in d["axes"].items()},
            shapes={name: tuple(tuple(s[level]) for level in _LEVELS) for name, s in d["shapes"].items()},  # type: ignore[misc]
        )


def component_roles(manifest: Manifest) -> dict[str, Role]:
    """What each component is: "text_encoder", "denoiser" or "vae_decoder".

    Text encoders are the ones the manifest's `conditioning` names (or whose name starts with
    "text_encoder"); the VAE decoder is named "vae_decoder"; the rest is the denoiser.
    """
    cond = manifest.conditioning or {}
    encoders = {pair[0] for pair in cond.get("clip_encoders") or ()}
    if cond.get("t5_encoder"):
        encoders.add(cond["t5_encoder"][0])
    roles: dict[str, Role] = {}
    for name in manifest.components:
        if name in encoders or name.startswith("text_encoder"):
            roles[name] = "text_encoder"
        elif name.startswith("vae"):
            roles[name] = "vae_decoder"
        else:
            roles[name] = "denoiser"
    return roles


def resolve_profiles(
    manifest: Manifest,
    request: ShapeRequest | None = None,
    components: Iterable[str] | None = None,
) -> dict[str, ComponentProfile]:
    """Every selected component's optimization profile for `request` (all components by default).

    Raises:
        InputError: a component is unknown, or the request is outside what the bundle supports;
            the message lists every problem found, each with the valid range and a fix.
    """
    request = request or ShapeRequest()
    names = select_components(manifest, components)
    roles = component_roles(manifest)
    problems: list[str] = []
    profiles = {}
    for name in names:
        comp = manifest.components[name]
        wanted = _requested_axes(manifest, name, roles[name], request, problems)
        axes = {}
        for axis_name, axis in comp.axes.items():
            value = wanted.get(axis_name, AxisProfile(axis.min, axis.opt, axis.max))
            axes[axis_name] = value
        profiles[name] = _profile_from_axes(name, comp, axes)
    if problems:
        raise InputError("the requested engine profile does not fit this bundle:\n  - " + "\n  - ".join(dict.fromkeys(problems)))
    # A last check in axis units; the user-unit checks above should already have caught everything.
    for name, profile in profiles.items():
        _check_axes_in_range(name, manifest.components[name], profile.axes)
    return profiles


def select_components(manifest: Manifest, components: Iterable[str] | None) -> list[str]:
    """The manifest's component names, or the requested subset in manifest order.

    Raises:
        InputError: a requested component is not in the bundle.
    """
    if components is None:
        return list(manifest.components)
    wanted = list(dict.fromkeys(components))
    if not wanted:
        return list(manifest.components)
    unknown = [c for c in wanted if c not in manifest.components]
    if unknown:
        raise InputError(f"unknown component(s) {', '.join(map(repr, unknown))}; this bundle has {', '.join(manifest.components)}")
    return [c for c in manifest.components if c in wanted]


def _requested_axes(manifest: Manifest, name: str, role: Role, request: ShapeRequest, problems: list[str]) -> dict[str, AxisProfile]:
    comp = manifest.components[name]
    wanted: dict[str, AxisProfile] = {}

    if request.batch is not None and "batch" in comp.axes:
        lo, opt, hi = request.batch
        factor = 2 if request.guidance == "cfg" and role in ("text_encoder", "denoiser") else 1
        value = AxisProfile(lo, factor * opt, factor * hi)
        axis = comp.axes["batch"]
        if value.max > axis.max:
            if factor == 2:
                problems.append(
                    f"batch {lo}:{opt}:{hi} images per call gives {name} up to {value.max} sequences per call "
                    f"(2 x {hi} with classifier-free guidance), but the bundle allows at most {axis.max}: use a batch max of "
                    f"at most {axis.max // 2}, build with guidance='none' if you never use guidance, or re-export with a larger --max-batch"
                )
            else:
                problems.append(
                    f"batch {lo}:{opt}:{hi} images per call exceeds {name}'s maximum batch {axis.max}: use a batch max of "
                    f"at most {axis.max}, or re-export with a larger --max-batch"
                )
        elif lo < axis.min:
            problems.append(f"batch min {lo} is below {name}'s minimum batch {axis.min}: use a batch min of at least {axis.min}")
        elif any(v % axis.multiple_of for v in value.as_tuple()):
            problems.append(f"{name}'s batch must be a multiple of {axis.multiple_of}; batch {lo}:{opt}:{hi} gives {value.as_tuple()}")
        wanted["batch"] = value

    if request.image_size is not None:
        vae = manifest.latent.vae_scale_factor
        for what, axis_name, index in (("height", "latent_height", 0), ("width", "latent_width", 1)):
            if axis_name not in comp.axes:
                continue
            axis = comp.axes[axis_name]
            pixels = tuple(size[index] for size in request.image_size)
            step = vae * axis.multiple_of
            for level, px in zip(_LEVELS, pixels):
                if px % step:
                    down, up = (px // step) * step, (px // step + 1) * step
                    nearest = f"{down} or {up}" if down >= axis.min * vae else f"{up}"
                    problems.append(
                        f"image {what} {px} (the {level} of image size {_format_sizes(request.image_size)}) is not a multiple of "
                        f"{step} ({name}: vae_scale_factor {vae} x {axis_name} multiple_of {axis.multiple_of}); nearest valid: {nearest}"
                    )
                elif not axis.min <= px // vae <= axis.max:
                    problems.append(
                        f"image {what} {px} (the {level} of image size {_format_sizes(request.image_size)}) is outside {name}'s "
                        f"range {axis.min * vae}..{axis.max * vae} pixels ({axis_name} {axis.min}..{axis.max} x vae_scale_factor {vae}); "
                        f"use a {what} in that range or re-export the bundle for larger images"
                    )
            wanted[axis_name] = AxisProfile(*(px // vae for px in pixels))

    if request.text_length is not None:
        wanted.update(_text_axes(manifest, name, request.text_length, problems, role))
    return wanted


def _text_axes(manifest: Manifest, name: str, text_length: Triple, problems: list[str], role: Role) -> dict[str, AxisProfile]:
    """The T5 encoder's `sequence` axis, and the denoiser's text axis.

    The denoiser's text axis is `context_length` = CLIP length + T5 length where the CLIP states
    come first (SD3), or the T5 encoder's own `sequence` axis (PixArt).
    """
    cond = manifest.conditioning or {}
    lo, opt, hi = text_length
    t5 = cond.get("t5_encoder")
    if not t5:
        problems.append(f"this {manifest.family} bundle has no T5 text encoder, so a text length does not apply; leave text length unset")
        return {}
    if hi < 1:
        problems.append(f"text length {lo}:{opt}:{hi} has a max of 0 T5 tokens; use a max of at least 1")
        return {}
    axes = manifest.components[name].axes
    if name == t5[0] or (role == "denoiser" and "sequence" in axes and "context_length" not in axes):
        if "sequence" not in axes:
            return {}
        axis = axes["sequence"]
        if hi > axis.max:
            problems.append(
                f"text length {lo}:{opt}:{hi} exceeds {name}'s maximum of {axis.max} T5 tokens: use a text length max of at most "
                f"{axis.max}, or re-export with a larger --max-sequence-length"
            )
        return {"sequence": AxisProfile(max(lo, axis.min), max(opt, axis.min), hi)}
    if role == "denoiser" and "context_length" in axes:
        clip_tokenizers = [tok for _, tok in cond.get("clip_encoders") or () if tok in manifest.tokenizers]
        clip_len = max((manifest.tokenizers[tok].max_length for tok in clip_tokenizers), default=0)
        axis = axes["context_length"]
        value = AxisProfile(clip_len + lo, clip_len + opt, clip_len + hi)
        if value.max > axis.max:
            problems.append(
                f"text length {lo}:{opt}:{hi} gives {name} a context of up to {value.max} tokens ({clip_len} CLIP + {hi} T5), "
                f"but the bundle allows at most {axis.max}: use a text length max of at most {axis.max - clip_len}"
            )
        elif value.min < axis.min:
            problems.append(f"text length min {lo} gives {name} a context below its minimum {axis.min}; raise the text length min")
        return {"context_length": value}
    return {}


def _check_axes_in_range(name: str, comp: Component, axes: Mapping[str, AxisProfile]) -> None:
    for axis_name, value in axes.items():
        axis = comp.axes[axis_name]
        for level, size in zip(_LEVELS, value.as_tuple()):
            if not axis.contains(size):
                raise InputError(
                    f"{name}: axis {axis_name!r} {level} size {size} is outside the bundle's range "
                    f"{axis.min}..{axis.max} (multiple of {axis.multiple_of})"
                )
        if not value.min <= value.opt <= value.max:
            raise InputError(f"{name}: axis {axis_name!r} sizes {value.as_tuple()} must satisfy min <= opt <= max")


def _profile_from_axes(name: str, comp: Component, axes: Mapping[str, AxisProfile]) -> ComponentProfile:
    shapes = {}
    for spec in comp.inputs:
        per_level = []
        for level in range(3):
            dims = []
            for dim in spec.shape:
                if isinstance(dim, int):
                    dims.append(dim)
                elif dim in axes:
                    dims.append(axes[dim].as_tuple()[level])
                else:
                    raise BundleError(
                        f"component {name!r}: input {spec.name!r} has axis {dim!r}, which the manifest's axes do not define; "
                        "the bundle is corrupt, re-export it"
                    )
            per_level.append(tuple(dims))
        shapes[spec.name] = tuple(per_level)
    used = {d for spec in comp.inputs for d in spec.shape if isinstance(d, str)}
    return ComponentProfile(component=name, axes={k: v for k, v in axes.items() if k in used}, shapes=shapes)  # type: ignore[arg-type]


def profile_from_shapes(
    name: str,
    component: Component,
    shapes: Mapping[str, tuple[Iterable[int], Iterable[int], Iterable[int]]],
) -> ComponentProfile:
    """A profile from explicit per-input (min, opt, max) shapes, as Polygraphy's --trt-*-shapes take them.

    Checks what the builder would reject, before it runs: every input present with the right rank,
    fixed dimensions equal to the manifest's, a shared axis name the same size in every input in
    each of min, opt and max, and every size inside the manifest's range.

    Raises:
        InputError: naming the input, the axis and the sizes that disagree.
    """
    expected = [s.name for s in component.inputs]
    missing = [n for n in expected if n not in shapes]
    extra = [n for n in shapes if n not in expected]
    if missing or extra:
        raise InputError(f"{name}: profile shapes must cover exactly the inputs {expected}; missing {missing}, unknown {extra}")
    axes: dict[str, list[int | None]] = {}
    seen_in: dict[tuple[str, int], str] = {}
    for spec in component.inputs:
        levels = [tuple(int(d) for d in s) for s in shapes[spec.name]]
        if len(levels) != 3:
            raise InputError(f"{name}: input {spec.name!r} needs (min, opt, max) shapes, got {len(levels)}")
        for level, shape in zip(_LEVELS, levels):
            if len(shape) != len(spec.shape):
                raise InputError(
                    f"{name}: input {spec.name!r} {level} shape {shape} has rank {len(shape)}, expected {len(spec.shape)} {spec.shape}"
                )
        for i, dim in enumerate(spec.shape):
            for li, level in enumerate(_LEVELS):
                size = levels[li][i]
                if isinstance(dim, int):
                    if size != dim:
                        raise InputError(f"{name}: input {spec.name!r} dimension {i} is fixed at {dim}, but its {level} shape has {size}")
                    continue
                sizes = axes.setdefault(dim, [None, None, None])
                if sizes[li] is None:
                    sizes[li] = size
                    seen_in[(dim, li)] = spec.name
                elif sizes[li] != size:
                    raise InputError(
                        f"{name}: axis {dim!r} is {sizes[li]} in input {seen_in[(dim, li)]!r} but {size} in input {spec.name!r} "
                        f"({level} shapes); every input must use the same size for a shared axis, in each of min, opt and max"
                    )
    resolved = {axis: AxisProfile(*sizes) for axis, sizes in axes.items()}  # type: ignore[misc]
    for axis_name in resolved:
        if axis_name not in component.axes:
            raise BundleError(f"component {name!r} uses axis {axis_name!r}, which its manifest axes do not define; re-export the bundle")
    _check_axes_in_range(name, component, resolved)
    return _profile_from_axes(name, component, resolved)
