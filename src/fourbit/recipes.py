"""Recipes: named, frozen, validated presets of SPEC §5 — which LayerSpec each layer role gets.

    >>> from fourbit import recipes
    >>> recipes.names()
    ['fp32', 'fp16', 'hfp8', 'ibm4', ...]
    >>> r = recipes.get("ibm4")
    >>> r.spec_for("first")          # the first layer stays in fp16

Roles: `default`, `first`, `last`, `pointwise_conv` (1×1), `depthwise`, `matmul`
(attention), `attention_probs` (the attention matmul whose first operand is softmax
probabilities, `QMatmul(probabilities=True)`), `lstm` (gate GEMMs). A role left at None
uses `default`; `attention_probs` left at None uses `matmul`'s spec.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fourbit.io import atomic_write
from fourbit.nn.spec import FP32_LAYER, LayerSpec, OperandSpec

ROLES = ("default", "first", "last", "pointwise_conv", "depthwise", "matmul", "attention_probs", "lstm")
# a role left at None takes its fallback's spec (`default` for any role not named here)
FALLBACK = {"attention_probs": "matmul"}


@dataclass(frozen=True)
class Recipe:
    """A training recipe: the LayerSpec for every layer role, plus name-glob overrides.

    `overrides` maps a module-name glob to a recipe name, whose `default` spec that module
    gets (e.g. `(("classifier.*", "fp16"),)`); convert's `policy` adds more.
    """

    name: str
    default: LayerSpec = FP32_LAYER
    first: LayerSpec | None = None
    last: LayerSpec | None = None
    pointwise_conv: LayerSpec | None = None
    depthwise: LayerSpec | None = None
    matmul: LayerSpec | None = None
    attention_probs: LayerSpec | None = None
    lstm: LayerSpec | None = None
    overrides: tuple[tuple[str, str], ...] = ()
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a recipe needs a non-empty name")
        for role in ROLES:
            spec = getattr(self, role)
            if not (isinstance(spec, LayerSpec) or (spec is None and role != "default")):
                raise ValueError(f"recipe {self.name!r}: role {role!r} must be a LayerSpec; got {spec!r}")
        object.__setattr__(self, "overrides", tuple((str(g), str(r)) for g, r in self.overrides))

    def spec_for(self, role: str) -> LayerSpec:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
        spec = getattr(self, role)
        if spec is not None:
            return spec
        return self.spec_for(FALLBACK[role]) if role in FALLBACK else self.default

    # -- TOML ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out: dict = {"name": self.name, "description": self.description}
        for role in ROLES:
            spec = getattr(self, role)
            if spec is not None:
                out[role] = _spec_to_dict(spec)
        if self.overrides:
            out["overrides"] = dict(self.overrides)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        data = dict(data)
        unknown = set(data) - {"name", "description", "overrides", *ROLES}
        if unknown:
            raise ValueError(
                f"unknown recipe keys {sorted(unknown)}; known: name, description, overrides, {ROLES}"
            )
        kwargs = {k: data[k] for k in ("name", "description") if k in data}
        for role in ROLES:
            if role in data:
                kwargs[role] = _spec_from_dict(data[role], role)
        kwargs["overrides"] = tuple(data.get("overrides", {}).items())
        return cls(**kwargs)

    def to_toml(self, path: str | Path | None = None) -> str:
        """The recipe as TOML text; also written (atomically) to `path` when given."""
        text = _toml(self.to_dict())
        if path is not None:
            atomic_write(path, lambda tmp: tmp.write_text(text))
        return text

    @classmethod
    def from_toml(cls, path: str | Path) -> Recipe:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"cannot read recipe {path}: {e}") from None
        return cls.from_dict(data)


def _spec_to_dict(spec: LayerSpec) -> dict:
    out = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, OperandSpec):
            value = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
        if value is not None:  # TOML has no null: a missing key means the default (None)
            out[f.name] = value
    return out


def _spec_from_dict(data: dict, where: str) -> LayerSpec:
    data = dict(data)
    operand_fields = {f.name for f in dataclasses.fields(OperandSpec)}
    layer_fields = {f.name for f in dataclasses.fields(LayerSpec)}
    unknown = set(data) - layer_fields
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(layer_fields)}")
    for role in ("weight", "activation", "grad_dx", "grad_dw"):
        if role in data:
            bad = set(data[role]) - operand_fields
            if bad:
                raise ValueError(
                    f"{where}.{role}: unknown keys {sorted(bad)}; known: {sorted(operand_fields)}"
                )
            data[role] = OperandSpec(**data[role])
    return LayerSpec(**data)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml(data: dict, prefix: str = "") -> str:
    """A minimal TOML writer for nested dicts of str/bool/int/float (what recipes hold)."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    parts = ["\n".join(scalars)] if scalars else []
    for key, table in tables:
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        body = _toml(table, name)
        parts.append(f"[{name}]\n{body}" if any(not isinstance(v, dict) for v in table.values()) else body)
    return "\n\n".join(p for p in parts if p) + ("\n" if not prefix else "")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


# -- the presets of SPEC §5 --------------------------------------------------------------------


def _float_layer(fmt: str, grad: str | None = None, gradscale: str = "current") -> LayerSpec:
    """W, A in `fmt` and gradients in `grad` (default `fmt`), all at scale 1. (choice) In
    place of a global loss scale, the gradient gets a per-layer power-of-two scale that
    puts its max near 2**8: far above the format's underflow, with headroom below its
    max for the sums of the GEMMs."""
    g = OperandSpec(grad or fmt)
    return LayerSpec(OperandSpec(fmt), OperandSpec(fmt), g, g, gradscale=gradscale, gradscale_max=256.0)


FP16_LAYER = _float_layer("fp16")
BF16_LAYER = _float_layer("bf16", gradscale="none")  # bf16 has float32's range: no scaling
HFP8_LAYER = _float_layer("hfp8_fwd", "hfp8_bwd")

RADIX4 = OperandSpec("fp4_radix4")
IBM4_LAYER = LayerSpec(
    weight=OperandSpec("int4", "sawb"),
    activation=OperandSpec("uint4", "pact"),  # PACT picks the signed symmetric grid for signed inputs
    grad_dx=RADIX4,
    grad_dw=RADIX4,
    tpr=True,  # (choice) phase 1 feeds dX, phase 0 feeds dW
    gradscale="adaptive",
)
# (choice) the one global loss scale of the no-GradScale baseline: 2**7 puts a
# batch-mean cross-entropy's output gradient (about 1/batch) near the top of the grid
NO_GRADSCALE_LOSS_SCALE = 128.0
# all4's first layer sees input pixels p in [0, 1] as round(15 p) / 15: the 16 levels of
# the article's round_half_even(15 p - 8), shifted by the integer 8
PIXELS = OperandSpec("uint4", "fixed", scale=1 / 15)


def _ibm4_variant(name: str, description: str, roles: dict | None = None, **changes) -> Recipe:
    """ibm4's inner layers with `changes` (an ablation), first and last layer in fp16; `roles`
    gives other roles their own LayerSpec."""
    layer = dataclasses.replace(IBM4_LAYER, **changes)
    return Recipe(name, layer, first=FP16_LAYER, last=FP16_LAYER, description=description, **(roles or {}))


def _gradients(spec: str | OperandSpec) -> dict:
    """Both backward GEMMs' gradients as `spec` (a format name or an OperandSpec), as a
    _ibm4_variant change."""
    spec = OperandSpec(spec) if isinstance(spec, str) else spec
    return {"grad_dx": spec, "grad_dw": spec}


def _dx_gradient(spec: OperandSpec) -> dict:
    """`spec` into the dX GEMMs only, ibm4's radix-4 (phase 0, no TPR) still into the dW GEMMs,
    as a _ibm4_variant change; GradScale keeps aiming at the radix-4 grid's top."""
    return {"grad_dx": spec, "tpr": False, "gradscale_max": RADIX4.fmt.max_value()}


# the diagnostics' fp16 gradients: scaled as the fp16 recipe's, one quantization for both GEMMs
FP16_GRADIENTS = dict(_gradients("fp16"), tpr=False, gradscale="current", gradscale_max=256.0)

LUQ_GRAD = OperandSpec("fp4_radix2", rounding="stochastic", underflow="stochastic")
MX = OperandSpec("mxfp4")
NV_GRAD = OperandSpec("nvfp4", rounding="stochastic")
# NVFP4 gradients into both backward GEMMs: the blocks carry the scale, so no GradScale, no TPR
NV_GRADIENTS = dict(_gradients(NV_GRAD), tpr=False, gradscale="none")
# the same rounded to nearest, as mxfp4's gradients are: half stochastic rounding's mean square
# error, a fixed function of the value instead of zero-mean noise
NV_NEAREST_GRADIENTS = dict(NV_GRADIENTS, **_gradients("nvfp4"))
SAWB_ACTIVATION = OperandSpec("int4", "sawb")  # a SAWB scale fitted every step, not a PACT clip
# the same, on the unsigned grid 0 ... 15 where the input is nonnegative (after a ReLU), as
# PACT's grid is, not on the nonnegative half of the signed one
UNSIGNED_SAWB_ACTIVATION = OperandSpec("uint4", "sawb")
# the same grids with the clip that minimizes each tensor's estimated quantization MSE: on the
# unsigned grid SAWB's clip is the signed grid's (fitted for 7 steps a side, not 15)
UNSIGNED_MSE_ACTIVATION = OperandSpec("uint4", "mse")
# attention probabilities and the values they mix in NVFP4 (blocks of 16 keys), NVFP4 gradients
NV_PROBS = dataclasses.replace(IBM4_LAYER, activation=OperandSpec("nvfp4"), **NV_GRADIENTS)
NV_PROBS_NEAREST = dataclasses.replace(NV_PROBS, **NV_NEAREST_GRADIENTS)  # the same, gradients to nearest

_PRESETS = [
    Recipe("fp32", description="float32 everywhere: the baseline"),
    Recipe("fp16", FP16_LAYER, description="fp16 weights, activations and gradients"),
    Recipe("hfp8", HFP8_LAYER, description="HFP8 (Sun et al. 2019): 1-4-3 forward, 1-5-2 backward"),
    _ibm4_variant("ibm4", "Sun et al. 2020: INT4 SAWB/PACT, radix-4 FP4 gradients, TPR, adaptive GradScale"),
    _ibm4_variant(
        "ibm4-notpr",
        "ibm4 without two-phase rounding (one gradient quantization feeds both GEMMs)",
        tpr=False,
    ),
    _ibm4_variant(
        "ibm4-radix2",
        "ibm4 with radix-2 FP4 gradients",
        **_gradients("fp4_radix2"),
    ),
    _ibm4_variant(
        "ibm4-nogradscale",
        "ibm4 with one fixed global loss scale instead of per-layer GradScale",
        gradscale="none",
        gradscale_init=NO_GRADSCALE_LOSS_SCALE,
    ),
    _ibm4_variant(
        "ibm4-radix8",
        "ibm4 with radix-8 FP4 gradients (two phases a factor 2 apart, as radix 4's)",
        **_gradients("fp4_radix8"),
    ),
    _ibm4_variant(
        "ibm4-fp16acc",
        "ibm4 with every 4-bit GEMM accumulated in fp16 chunks of 64 (SPEC §4)",
        accumulate="fp16",
    ),
    _ibm4_variant(
        "ibm4-pw-hfp8",
        "ibm4 with the 1x1 convolutions in HFP8 (SPEC's option for ibm4, for MobileNet-style nets)",
        roles={"pointwise_conv": HFP8_LAYER},
    ),
    _ibm4_variant(
        "ibm4-lstm-sawb",
        "ibm4 with the LSTM gate GEMMs' inputs (x and h) on a SAWB scale fitted every "
        "step instead of a PACT clip",
        roles={"lstm": dataclasses.replace(IBM4_LAYER, activation=SAWB_ACTIVATION)},
    ),
    _ibm4_variant(
        "ibm4-sawb",
        "ibm4 with every activation on a SAWB scale fitted every step (as the weights) instead "
        "of a PACT clip",
        activation=SAWB_ACTIVATION,
    ),
    _ibm4_variant(
        "ibm4-gradsr",
        "ibm4 with the radix-4 gradients rounded stochastically (unbiased between grid "
        "neighbours) instead of to the nearest",
        **_gradients(OperandSpec("fp4_radix4", rounding="stochastic")),
    ),
    _ibm4_variant(
        "ibm4-luqgrad",
        "ibm4 with LUQ's gradient quantizer (radix-2 FP4, stochastic rounding and underflow); "
        "two-phase rounding and adaptive GradScale kept: what closes the Transformer's gap",
        **_gradients(LUQ_GRAD),
    ),
    _ibm4_variant(
        "ibm4-fp16grad",
        "diagnostic: ibm4's 4-bit forward with fp16 gradients (which half of ibm4 costs accuracy)",
        **FP16_GRADIENTS,
    ),
    _ibm4_variant(
        "ibm4-matmul-fp16grad",
        "diagnostic: ibm4 with fp16 gradients in the attention matmuls only (scores and mix), "
        "the 4-bit gradients kept in every Linear",
        roles={"matmul": dataclasses.replace(IBM4_LAYER, **FP16_GRADIENTS)},
    ),
    _ibm4_variant(
        "ibm4-fp16dx",
        "diagnostic: fp16 gradients into the dX GEMMs only (the path whose error compounds down "
        "the layers), ibm4's radix-4 (phase 0) into the dW GEMMs",
        **_dx_gradient(OperandSpec("fp16")),
    ),
    _ibm4_variant(
        "ibm4-fp16dw",
        "diagnostic: fp16 gradients into the dW GEMMs only, radix-4 (phase 0, no TPR) into the dX GEMMs",
        grad_dw=OperandSpec("fp16"),
        tpr=False,
    ),
    _ibm4_variant(
        "ibm4-nvfp4dx",
        "ibm4 with NVFP4 gradients (e2m1 in blocks of 16 with fp8 scales, stochastic rounding) "
        "into the dX GEMMs, where the error compounds down the layers; radix-4 (phase 0) into dW",
        **_dx_gradient(NV_GRAD),
    ),
    _ibm4_variant(
        "ibm4-nvfp4grad",
        "ibm4's INT4 forward with NVFP4 gradients (e2m1 in blocks of 16 with fp8 scales, "
        "stochastic rounding) into both backward GEMMs; the blocks carry the scale, no GradScale",
        **NV_GRADIENTS,
    ),
    _ibm4_variant(
        "ibm4-sawb-nvfp4grad",
        "ibm4-nvfp4grad with every activation on a SAWB scale fitted every step instead of a "
        "PACT clip (luq4's INT4 forward): whether the clip is what the 4-bit forward costs",
        activation=SAWB_ACTIVATION,
        **NV_GRADIENTS,
    ),
    _ibm4_variant(
        "ibm4-sawb-nvfp4grad-nvprobs",
        "ibm4-sawb-nvfp4grad with the attention probabilities and values in NVFP4 (blocks of 16 "
        "keys, each with its own fp8 scale): one INT4 scale per tensor flushes most probabilities",
        roles={"attention_probs": NV_PROBS},
        activation=SAWB_ACTIVATION,
        **NV_GRADIENTS,
    ),
    _ibm4_variant(
        "ibm4-rowsawb-nvfp4grad-nvprobs",
        "ibm4-sawb-nvfp4grad-nvprobs with one SAWB scale per activation row (per token) in place "
        "of one per tensor, where that flushes a fifth of the Linear inputs; for Linear, LSTM "
        "and matmul layers only (a convolution's reduction does not factor a row scale out)",
        roles={"attention_probs": NV_PROBS},
        activation=dataclasses.replace(SAWB_ACTIVATION, granularity="row"),
        **NV_GRADIENTS,
    ),
    _ibm4_variant(
        "ibm4-usawb-nvfp4grad-nvprobs",
        "ibm4-sawb-nvfp4grad-nvprobs with the SAWB activations on the unsigned grid 0...15 where a "
        "layer's first input is nonnegative (after a ReLU), as PACT's grid is, instead of the "
        "eight nonnegative codes of the signed grid; signed inputs keep the signed one",
        roles={"attention_probs": NV_PROBS},
        activation=UNSIGNED_SAWB_ACTIVATION,
        **NV_GRADIENTS,
    ),
    _ibm4_variant(
        "ibm4-usawb-nvfp4rtngrad-nvprobs",
        "ibm4-usawb-nvfp4grad-nvprobs with its NVFP4 gradients rounded to nearest instead of "
        "stochastically (as mxfp4's): whether stochastic rounding's noise is what costs the last, "
        "low-learning-rate epoch",
        roles={"attention_probs": NV_PROBS_NEAREST},
        activation=UNSIGNED_SAWB_ACTIVATION,
        **NV_NEAREST_GRADIENTS,
    ),
    _ibm4_variant(
        "ibm4-umse-nvfp4rtngrad-nvprobs",
        "ibm4-usawb-nvfp4rtngrad-nvprobs with each activation's clip fitted to minimize its "
        "estimated quantization MSE (scaler 'mse') instead of by SAWB's formula, which sets the "
        "clip of a ReLU output's unsigned grid as if it were the signed grid's",
        roles={"attention_probs": NV_PROBS_NEAREST},
        activation=UNSIGNED_MSE_ACTIVATION,
        **NV_NEAREST_GRADIENTS,
    ),
    _ibm4_variant(
        "ibm4-usawb-nvprobs-fp16grad",
        "diagnostic: ibm4-usawb-nvfp4grad-nvprobs's 4-bit forward with fp16 gradients (what its "
        "NVFP4 gradients cost)",
        roles={"attention_probs": dataclasses.replace(NV_PROBS, **FP16_GRADIENTS)},
        activation=UNSIGNED_SAWB_ACTIVATION,
        **FP16_GRADIENTS,
    ),
    _ibm4_variant(
        "ibm4-fp16fwd",
        "diagnostic: fp16 weights and activations with ibm4's 4-bit gradients (the other half)",
        weight=OperandSpec("fp16"),
        activation=OperandSpec("fp16"),
    ),
    Recipe(
        "all4",
        IBM4_LAYER,
        first=dataclasses.replace(IBM4_LAYER, activation=PIXELS),
        description="every GEMM operand 4-bit, first and last layer and input pixels included",
    ),
    Recipe(
        "luq4",
        LayerSpec(OperandSpec("int4", "sawb"), SAWB_ACTIVATION, LUQ_GRAD, LUQ_GRAD, gradscale="current"),
        first=FP16_LAYER,
        last=FP16_LAYER,
        description="LUQ (Chmiel et al. 2023): INT4 SAWB, radix-2 FP4 gradients, "
        "stochastic rounding and underflow",
    ),
    Recipe(
        "mxfp4",
        LayerSpec(MX, MX, MX, MX),
        first=FP16_LAYER,
        last=FP16_LAYER,
        description="OCP MXFP4 for every operand (blocks of 32 along each GEMM's reduction axis)",
    ),
    Recipe(
        "nvfp4",
        LayerSpec(OperandSpec("nvfp4_2d"), OperandSpec("nvfp4"), NV_GRAD, NV_GRAD, hadamard_dw=True),
        first=BF16_LAYER,
        last=BF16_LAYER,
        description="NVIDIA 2025: NVFP4, 16x16 weight blocks, stochastic gradients, Hadamard on dW",
    ),
]
_REGISTRY = {r.name: r for r in _PRESETS}


def names() -> list[str]:
    """Names accepted by `get`."""
    return list(_REGISTRY)


def get(name: str | Recipe) -> Recipe:
    """The named preset (a Recipe passes through)."""
    if isinstance(name, Recipe):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(_REGISTRY)}") from None
