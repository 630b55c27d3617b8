"""LoRA key layouts -> (component, module, A, B, scale), resolved against the bundle's weight map.

Accepted layouts (a file may mix components, not layouts of one tensor):

- **diffusers / PEFT**: `<component>.<module>.lora_A.weight` / `.lora_B.weight` (or `lora_down` /
  `lora_up`, or the older `lora.down` / `lora_linear_layer.down` and attention-processor
  `<path>.processor.to_q_lora.down.weight` forms), an optional `<component>.<module>.alpha`, and
  the `lora_adapter_metadata` header diffusers writes (`r`, `lora_alpha`, `alpha_pattern`,
  `rank_pattern`, `use_rslora` per component). `<component>` is a bundle component (`unet`,
  `transformer`, `text_encoder`, `text_encoder_2`, ...); keys without one belong to the denoiser.
  `base_model.model.` prefixes are dropped.
- **kohya** (sd-scripts): `lora_unet_<module with _>` / `lora_te_`, `lora_te1_`, `lora_te2_`,
  `lora_te3_` with `.lora_down.weight` / `.lora_up.weight` / `.alpha`. U-Net names may be diffusers'
  (`down_blocks_0_attentions_0_...`, SD 1.x) or the original LDM/SGM ones (`input_blocks_4_1_...`,
  SDXL); text encoders use transformers' names (`text_model_encoder_layers_0_self_attn_q_proj`).
- **BFL Flux** (kohya `lora_unet_double_blocks_0_img_attn_qkv`, ComfyUI `diffusion_model.double_blocks.
  0.img_attn.qkv`, `base_model.model.` ...): fused modules split into diffusers' - `img_attn.qkv` into
  `attn.to_q/to_k/to_v`, `single_blocks.N.linear1` into `attn.to_q/to_k/to_v` + `proj_mlp` (row
  sizes from the bundle), `final_layer.adaLN_modulation.1` with its shift/scale halves swapped.

The scale of a layer is `alpha / rank` (alpha defaults to the rank; `alpha / sqrt(rank)` with
rsLoRA). Names are matched against the modules the manifest's weight map knows, never guessed: a
key that resolves to nothing is reported, and a file with any such key is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from latentrt.errors import InputError
from latentrt.runtime.lora.weights import ComponentWeights

# role suffixes, longest first
_DOWN = (".lora_linear_layer.down.weight", ".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".down.weight")
_UP = (".lora_linear_layer.up.weight", ".lora_up.weight", ".lora_B.weight", ".lora.up.weight", ".up.weight")
_UNSUPPORTED = ("dora_scale", "lora_magnitude_vector", "hada_", "lokr_", ".diff", ".diff_b", "lora_B.bias", "lora_up.bias")
# attention-processor LoRA names (diffusers before PEFT) -> module names
_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_TEXT_PROCESSOR = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
_KOHYA_TEXT = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}


@dataclass
class LoraLayer:
    """One adapted weight: `delta = scale * up @ down` added to `component`'s `module.weight`."""

    component: str
    module: str
    down: np.ndarray
    up: np.ndarray
    scale: float
    keys: tuple[str, ...] = field(default=())

    @property
    def param(self) -> str:
        return f"{self.module}.weight"


@dataclass
class _Entry:
    down: str | None = None
    up: str | None = None
    alpha: str | None = None


def parse_lora(
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
    *,
    family: str,
    denoiser: str,
    weights: Mapping[str, ComponentWeights],
    source: str = "the LoRA file",
) -> list[LoraLayer]:
    """The file's layers, each resolved to a bundle component's module and checked against it.

    Args:
        tensors, metadata: from `files.read_lora_file`.
        family: the bundle's family ("flux" enables the BFL layout).
        denoiser: the denoiser component ("transformer" or "unet").
        weights: the weight maps of the bundle's components.

    Raises:
        InputError: keys that resolve to no module of this bundle (listed), unsupported LoRA kinds
            (DoRA, LoHa, LoKr, bias deltas), rank mismatches between A and B, shapes that do not fit
            the module, NaN/Inf values - all problems at once.
    """
    if not tensors:
        raise InputError(f"{source} holds no tensors; it is not a LoRA")
    unsupported = sorted(k for k in tensors if any(u in k for u in _UNSUPPORTED))
    if unsupported:
        raise InputError(
            f"{source} holds tensors of a LoRA variant latentrt does not merge (DoRA, LoHa, LoKr or bias/norm deltas): "
            f"{_listed(unsupported)}; use a plain LoRA (A/B or down/up matrices only)"
        )
    entries: dict[str, _Entry] = {}
    unmatched: list[str] = []
    for key in tensors:
        name, role = _role(key)
        if name is None:
            unmatched.append(key)
            continue
        setattr(entries.setdefault(name, _Entry()), role, key)
    aliases = {comp: _aliases(comp, w, family=family, denoiser=denoiser) for comp, w in weights.items()}
    config = _metadata_config(metadata, source)
    layers, problems = [], []
    for name, entry in entries.items():
        keys = tuple(k for k in (entry.down, entry.up, entry.alpha) if k)
        if entry.down is None or entry.up is None:
            if entry.down is None and entry.up is None:  # an alpha with nothing to scale
                unmatched.extend(keys)
            else:
                problems.append(f"{name}: has {'A (down)' if entry.down else 'B (up)'} but no {'B (up)' if entry.down else 'A (down)'} matrix")
            continue
        resolved = _resolve(name, aliases, denoiser=denoiser)
        if resolved is None:
            unmatched.extend(keys)
            continue
        component, targets, module_path = resolved
        down, up = tensors[entry.down], tensors[entry.up]
        problem = _check_pair(name, down, up, tensors[entry.alpha] if entry.alpha else None)
        if problem:
            problems.append(problem)
            continue
        rank = down.shape[0]
        if entry.alpha is not None:
            scale = float(np.asarray(tensors[entry.alpha]).reshape(-1)[0]) / rank
        else:
            scale = _metadata_scale(config.get(component), module_path, rank)
        cw = weights[component]
        for module, rows in _split(targets, cw, up.shape[0], name, problems):
            part_up = up if rows is None else up[rows]
            shape = cw.param_shape(f"{module}.weight")
            want = (part_up.shape[0], *down.shape[1:])
            if want != shape and not (np.prod(want) == np.prod(shape) and want[0] == shape[0]):
                problems.append(
                    f"{name}: its update has shape {list(want)} but {component}'s {module}.weight is {list(shape)} - "
                    "the LoRA was trained for another model (family or size)"
                )
                continue
            layers.append(LoraLayer(component, module, down, part_up, scale, keys))
    if unmatched:
        known = ", ".join(sorted(weights))
        raise InputError(
            f"{source}: {len(unmatched)} key(s) match no weight of this {family} bundle ({known}): {_listed(sorted(unmatched))}. "
            "The LoRA was made for another model family or architecture, or uses a layout latentrt does not read"
        )
    if problems:
        raise InputError(f"{source} does not fit this bundle:\n  - " + "\n  - ".join(problems[:20]) + ("\n  - ..." if len(problems) > 20 else ""))
    if not layers:
        raise InputError(f"{source} holds no LoRA layer (no A/B or down/up pairs)")
    return layers


def _listed(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _role(key: str) -> tuple[str | None, str]:
    """(the layer's name, 'down' | 'up' | 'alpha'), or (None, '') for a key of no known role."""
    if key.endswith(".alpha"):
        return _normalise(key[: -len(".alpha")]), "alpha"
    for role, suffixes in (("down", _DOWN), ("up", _UP)):
        for suffix in suffixes:
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                if suffix in (".down.weight", ".up.weight"):
                    head, _, last = name.rpartition(".")
                    if last not in _PROCESSOR:  # only the processor form `to_q_lora.down.weight` ends like this
                        return None, ""
                return _normalise(name), role
    return None, ""


def _normalise(name: str) -> str:
    """Drop PEFT's `base_model.model.` and map attention-processor names to module names."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    head, _, last = name.rpartition(".")
    if last in _PROCESSOR:
        head = head.replace(".processor", "")
        text = ".self_attn" in head or head.startswith("text_encoder")
        name = f"{head}.{(_TEXT_PROCESSOR if text else _PROCESSOR)[last]}"
    return name


def _resolve(name: str, aliases: Mapping[str, Mapping[str, list]], *, denoiser: str):
    """(component, targets, module path as the file names it) for a layer name, or None."""
    for prefix, component in _KOHYA_TEXT.items():
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            return _lookup(component, rest, aliases)
    if name.startswith("lora_unet_") or name.startswith("lora_transformer_"):
        return _lookup(denoiser, name.split("_", 2)[2], aliases)
    head, _, rest = name.partition(".")
    if head in aliases and rest:
        return _lookup(head, rest, aliases)
    if head == "diffusion_model" and rest:
        return _lookup(denoiser, rest, aliases)
    return _lookup(denoiser, name, aliases)


def _lookup(component: str, path: str, aliases):
    table = aliases.get(component)
    if table is None or path not in table:
        return None
    return component, table[path], path


def _split(targets: list, cw: ComponentWeights, rows: int, name: str, problems: list):
    """(module, rows of B) for each target: a fused BFL module's rows split by the bundle's sizes."""
    if len(targets) == 1 and targets[0][1] != "swap":
        return [(targets[0][0], None)]
    sizes = [cw.param_shape(f"{module}.weight")[0] for module, _ in targets]
    if sum(sizes) != rows:
        problems.append(
            f"{name}: B has {rows} rows, the modules it splits into ({', '.join(m for m, _ in targets)}) have {sum(sizes)} - "
            "the LoRA was trained for another model size"
        )
        return []
    out, start = [], 0
    for (module, order), size in zip(targets, sizes):
        index = np.arange(start, start + size)
        if order == "swap":  # BFL's final adaLN is [shift, scale]; diffusers' norm_out is [scale, shift]
            index = np.roll(index, size // 2)
        out.append((module, index))
        start += size
    return out


def _check_pair(name: str, down: np.ndarray, up: np.ndarray, alpha) -> str | None:
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        return f"{name}: A has shape {list(down.shape)} and B {list(up.shape)}; expected 2-D matrices (Linear) or 4-D (Conv)"
    if up.shape[1] != down.shape[0] or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        return f"{name}: rank mismatch - A (down) has rank {down.shape[0]} ({list(down.shape)}), B (up) {up.shape[1]} ({list(up.shape)})"
    for what, value in (("A", down), ("B", up), ("alpha", alpha)):
        if value is not None and not np.isfinite(value).all():
            return f"{name}: {what} holds NaN or infinite values; the file is corrupt"
    return None


def _metadata_config(metadata: Mapping[str, str], source: str) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` header ({"transformer.r": 4, ...}) per component."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InputError(f"{source}: its lora_adapter_metadata header is not valid JSON ({err})") from err
    config: dict[str, dict] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, field_name = key.partition(".")
        config.setdefault(component, {})[field_name] = value
    for component, c in config.items():
        if c.get("use_dora"):
            raise InputError(f"{source}: the {component} adapter is DoRA (use_dora); latentrt merges plain LoRA only")
    return config


def _pattern_value(patterns: Mapping[str, float], module: str):
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module) or module == key:
            return value
    return None


def _metadata_scale(config: Mapping | None, module: str, rank: int) -> float:
    """PEFT's scaling for `module`: lora_alpha / r (or / sqrt(r) with rsLoRA), 1 without metadata."""
    if not config:
        return 1.0
    r = _pattern_value(config.get("rank_pattern"), module) or config.get("r") or rank
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    alpha = config.get("lora_alpha", r) if alpha is None else alpha
    return float(alpha) / (float(r) ** 0.5 if config.get("use_rslora") else float(r))


# ------------------------------------------------------------------------------------------------
# Names each component's modules go by


def _aliases(component: str, cw: ComponentWeights, *, family: str, denoiser: str) -> dict[str, list]:
    """Every name a module of `component` may have in a LoRA file -> [(module, rows)]: its own
    path, the same with "_" for "." (kohya), and the layouts of other codebases."""
    table: dict[str, list] = {}
    ambiguous: set[str] = set()

    def add(alias: str, targets: list) -> None:
        for name in {alias, alias.replace(".", "_")}:
            if name in table and table[name] != targets:
                ambiguous.add(name)
            table[name] = targets

    for module in sorted(cw.modules):
        add(module, [(module, None)])
        if component.startswith("text_encoder"):  # transformers 5 dropped CLIPTextModel's `text_model.` level
            add(module[len("text_model.") :] if module.startswith("text_model.") else f"text_model.{module}", [(module, None)])
    if component == denoiser == "unet":
        for module, ldm in _ldm_names(cw.modules).items():
            add(ldm, [(module, None)])
    if component == denoiser and family == "flux":
        for bfl, targets in _bfl_names(cw.modules).items():
            add(bfl, targets)
    for name in ambiguous:
        del table[name]
    return table


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _ldm_names(modules: set[str]) -> dict[str, str]:
    """diffusers U-Net module -> its name in the original LDM / SGM U-Net (kohya's SDXL names)."""
    per_block = 1 + max((int(m.split(".")[3]) for m in modules if re.match(r"down_blocks\.0\.resnets\.\d+\.", m)), default=0)
    with_attention = {int(m.split(".")[1]) for m in modules if re.match(r"up_blocks\.\d+\.attentions\.", m)}
    out = {}
    for module in modules:
        if module in _UNET_TOP:
            out[module] = _UNET_TOP[module]
            continue
        m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", module)
        if m:
            kind, block, inner, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if kind == "down_blocks":
                base = 1 + block * (per_block + 1)
                place = {"resnets": f"{base + index}.0", "attentions": f"{base + index}.1", "downsamplers": f"{base + per_block}.0"}[inner]
                top = "input_blocks"
            else:
                base = block * (per_block + 1)
                up_at = 2 if block in with_attention else 1
                place = {"resnets": f"{base + index}.0", "attentions": f"{base + index}.1", "upsamplers": f"{base + per_block}.{up_at}"}[inner]
                top = "output_blocks"
            if inner == "resnets":
                rest = _resnet_rest(rest)
            elif inner == "downsamplers":
                rest = rest.replace("conv", "op", 1)
            out[module] = f"{top}.{place}.{rest}"
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module)
        if m:
            inner, index, rest = m.group(1), int(m.group(2)), m.group(3)
            place = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((inner, index))
            if place is not None:
                out[module] = f"middle_block.{place}.{_resnet_rest(rest) if inner == 'resnets' else rest}"
    return out


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _RESNET.get(head, head) + (f".{tail}" if tail else "")


def _bfl_names(modules: set[str]) -> dict[str, list]:
    """Black Forest Labs' Flux module names -> diffusers' FluxTransformer2DModel modules (fused ones
    split into several, each with the rows of B it takes)."""
    out: dict[str, list] = {}

    def put(bfl: str, *targets: str, order=None) -> None:
        if all(t in modules for t in targets):
            out[bfl] = [(t, order) for t in targets] if len(targets) > 1 or order else [(targets[0], None)]

    double = sorted({int(m.split(".")[1]) for m in modules if m.startswith("transformer_blocks.")})
    single = sorted({int(m.split(".")[1]) for m in modules if m.startswith("single_transformer_blocks.")})
    for i in double:
        b, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        put(f"{d}.img_attn.qkv", f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", order="split")
        put(f"{d}.img_attn.proj", f"{b}.attn.to_out.0")
        put(f"{d}.img_mlp.0", f"{b}.ff.net.0.proj")
        put(f"{d}.img_mlp.2", f"{b}.ff.net.2")
        put(f"{d}.img_mod.lin", f"{b}.norm1.linear")
        put(f"{d}.txt_attn.qkv", f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj", order="split")
        put(f"{d}.txt_attn.proj", f"{b}.attn.to_add_out")
        put(f"{d}.txt_mlp.0", f"{b}.ff_context.net.0.proj")
        put(f"{d}.txt_mlp.2", f"{b}.ff_context.net.2")
        put(f"{d}.txt_mod.lin", f"{b}.norm1_context.linear")
    for i in single:
        b, s = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        put(f"{s}.linear1", f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp", order="split")
        put(f"{s}.linear2", f"{b}.proj_out")
        put(f"{s}.modulation.lin", f"{b}.norm.linear")
    for bfl, module in (
        ("img_in", "x_embedder"), ("txt_in", "context_embedder"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"), ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"), ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"), ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ("final_layer.linear", "proj_out"),
    ):
        put(bfl, module)
    put("final_layer.adaLN_modulation.1", "norm_out.linear", order="swap")
    return out
