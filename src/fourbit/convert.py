"""`convert(model, recipe)`: swap every Linear / Conv1d / Conv2d / LSTM for its quantized
twin, in place, with the LayerSpec the recipe's layer policy picks; `summary(model)`.
nn.ReLU / nn.ReLU6 modules become MaskedReLU (exact, 1 bit per element saved for backward)."""

from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from fourbit.nn import QConv1d, QConv2d, QLinear, QMatmul, QuantState
from fourbit.nn.activation import MaskedReLU
from fourbit.nn.lstm import QLSTM
from fourbit.nn.spec import LayerSpec
from fourbit.recipes import Recipe
from fourbit.recipes import get as get_recipe

_SWAPS = {nn.Linear: QLinear, nn.Conv1d: QConv1d, nn.Conv2d: QConv2d, nn.LSTM: QLSTM}
_QUANTIZED = (QLinear, QConv1d, QConv2d, QLSTM, QMatmul)
# modules whose GEMMs run inside a functional call convert cannot reach
_OPAQUE = {
    nn.MultiheadAttention: "its GEMMs run inside F.multi_head_attention_forward; "
    "build attention from Linear layers and fourbit.nn.QMatmul",
    nn.Transformer: "uses nn.MultiheadAttention (see there)",
    nn.TransformerEncoderLayer: "uses nn.MultiheadAttention (see there)",
    nn.TransformerDecoderLayer: "uses nn.MultiheadAttention (see there)",
}
_UNSUPPORTED = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
                nn.GRU, nn.RNN)  # fmt: skip


@dataclass(frozen=True)
class Skipped:
    """A module convert left as it was, and why."""

    name: str
    kind: str
    reason: str


def _is_gemm(m: nn.Module) -> bool:
    return type(m) in _SWAPS or isinstance(m, _QUANTIZED)


def _order(model: nn.Module, example_input) -> list[str]:
    """Names of the GEMM modules in the order they run (or are registered, without input)."""
    names = [n for n, m in model.named_modules() if _is_gemm(m)]
    if example_input is None:
        return names
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
        for n, m in model.named_modules()
        if _is_gemm(m)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order + [n for n in names if n not in order]


def _role(name: str, module: nn.Module, first: str | None, last: str | None) -> str:
    if name == first:
        return "first"
    if name == last:
        return "last"
    if isinstance(module, QMatmul):
        return "attention_probs" if module.probabilities else "matmul"
    if isinstance(module, nn.LSTM):
        return "lstm"
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise"
        if all(k == 1 for k in module.kernel_size):
            return "pointwise_conv"
    return "default"


def _resolve(value) -> LayerSpec:
    if isinstance(value, LayerSpec):
        return value
    return get_recipe(value).default


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def convert(
    model: nn.Module,
    recipe: str | Recipe,
    policy: dict[str, str | Recipe | LayerSpec] | None = None,
    example_input=None,
    seed: int = 0,
    verbose: bool = True,
) -> nn.Module:
    """Quantize `model` in place as `recipe` says and return it.

    First and last layer: the first and last GEMM module to run on `example_input`, or, with
    no input, the first and last registered. `policy` maps module-name globs to a recipe
    name, Recipe or LayerSpec and wins over the roles (`{"classifier.*": "fp16"}`). Modules
    that cannot be converted are left whole and listed by `summary` with the reason.
    Each layer's random generator is seeded from `seed` and its name. Prints the per-layer
    table of `summary` unless `verbose=False`.
    """
    recipe = get_recipe(recipe)
    globs = list(recipe.overrides) + list((policy or {}).items())
    for _, value in globs:
        _resolve(value)  # unknown recipe names fail before anything is swapped
    order = _order(model, example_input)
    first, last = (order[0], order[-1]) if order else (None, None)

    skipped: list[Skipped] = []
    opaque_prefixes: list[str] = []
    quantized_any = False
    for name, module in list(model.named_modules()):
        if any(name.startswith(p + ".") for p in opaque_prefixes):
            if _is_gemm(module):
                skipped.append(Skipped(name, type(module).__name__, "inside an unconverted module"))
            continue
        if type(module) in _OPAQUE:
            skipped.append(Skipped(name, type(module).__name__, _OPAQUE[type(module)]))
            opaque_prefixes.append(name)
            continue
        if isinstance(module, _UNSUPPORTED):
            skipped.append(Skipped(name, type(module).__name__, "no quantized version of this module"))
            continue
        if not _is_gemm(module):
            if isinstance(module, tuple(_SWAPS)):  # a subclass: its own forward would be lost
                skipped.append(Skipped(name, type(module).__name__, "subclass of a torch layer; not swapped"))
            continue
        spec = recipe.spec_for(_role(name, module, first, last))
        for pattern, value in globs:
            if fnmatch.fnmatchcase(name, pattern):
                spec = _resolve(value)
        if isinstance(module, nn.LSTM) and module.proj_size:
            skipped.append(Skipped(name, "LSTM", "proj_size > 0 is not supported"))
            continue
        _install(model, name, module, spec, _seed(seed, name))
        quantized_any |= not spec.is_fp32
    if quantized_any:  # an exact swap that saves memory: nothing to do under fp32
        for name, module in list(model.named_modules()):
            if type(module) in (nn.ReLU, nn.ReLU6) and name:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, MaskedReLU.from_float(module))
    model._fourbit_skipped = skipped
    if verbose:
        summary(model)
    return model


def _install(model: nn.Module, name: str, module: nn.Module, spec: LayerSpec, seed: int) -> None:
    if isinstance(module, _QUANTIZED):  # already quantized (or a QMatmul): new spec, fresh state
        if isinstance(module, QLSTM):
            del module.quant
            module._add_quant(spec, seed)
        else:
            module.quant = QuantState(spec, seed, two_activations=isinstance(module, QMatmul))
            if hasattr(module, "_check"):
                module._check()
        return
    quantized = _SWAPS[type(module)].from_float(module, spec, seed)
    weight = next(module.parameters(), None)
    if weight is not None:  # the new quantization state lives where the layer's weights do
        quantized.quant.to(weight.device)
    if not name:
        raise ValueError("convert() swaps submodules in place; wrap a bare layer in nn.Sequential")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)


def summary(model: nn.Module, file=None) -> list[dict]:
    """Per-layer table (name, kind, W, A, G, parameters), printed and returned as rows."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, _QUANTIZED):
            continue
        spec = module.spec if isinstance(module, QLSTM) else module.quant.spec
        w, a, g = spec.describe()
        if isinstance(module, QMatmul):  # both operands are activations: no weight
            w = a
        params = sum(p.numel() for n, p in module.named_parameters() if not n.startswith("quant."))
        rows.append({"name": name, "kind": type(module).__name__, "W": w, "A": a, "G": g, "params": params})
    for s in getattr(model, "_fourbit_skipped", []):
        rows.append(
            {"name": s.name, "kind": s.kind, "W": "not converted", "A": "", "G": s.reason, "params": 0}
        )
    widths = {k: max([len(k)] + [len(str(r[k])) for r in rows]) for k in ("name", "kind", "W", "A", "G")}
    header = "  ".join(k.ljust(widths[k]) for k in widths) + "  params"
    lines = [header, "-" * len(header)]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k in widths) + f"  {r['params']:,}" for r in rows]
    print("\n".join(lines), file=file)
    return rows
