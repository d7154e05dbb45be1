"""What quantization does during training: per-operand telemetry (`fourbit inspect`),
BatchNorm drift against an fp32 shadow (`fourbit bn-drift`), and a trained run's weights
evaluated under other forwards (`fourbit evaluate`).

Telemetry listens on each quantized layer's `QuantState.observer`, which sees every GEMM
operand x before and q after quantization: "A", "W" (or "B", a QMatmul's second
activation), "G_dx" and "G_dw" (gradients arrive as s·dY, s the layer's GradScale value).
Per layer and operand, in float64, pooled over every call (an LSTM's recurrent GEMM runs
once per time step) of every inspected step:

    sqnr_db    10·log10(Σx² / Σ(q−x)²); null when q == x everywhere (or x is all 0)
    clipped    fraction of the elements with x outside [lo, hi], the smallest and largest
               value the operand's grid produces at the scale it was quantized with:
               INT grids scale·qmin ... scale·qmax (SAWB / max / fixed scales recomputed from
               x as the layer does, per row for row scales; PACT: the grid of its clip α);
               log and float grids their own range at scale 1 in the GEMM's phase (gradients
               come GradScale-scaled); block formats (MXFP4, NVFP4) per element, ±(largest
               element value × that element's block scale). x = ±inf counts as clipped.
    flushed    fraction of the nonzero x whose q is 0
    bias       Σ(q−x) / Σ|x|: the mean error relative to the mean magnitude
    gradscale  (G operands) the GradScale value: at the last call, smallest, largest
Non-finite x (a step the training loop then skips) is counted in `nonfinite` and left out
of the sums. `sqnr_db_per_step` is the same SQNR step by step; `grad_hist` counts
log2 |s·dY| of the dX-GEMM gradient (the quantizer's input) in bins of HIST_WIDTH from
HIST_LOW to HIST_HIGH (the last bin closed), with the zeros, those below and above apart.

Only layers with a quantized spec are seen: an fp32 layer calls the plain torch op.

`gradients` (GradientFidelity) is the end-to-end view: per parameter tensor, the SQNR and
cosine of the gradient the optimizer receives against a reference gradient computed on the
same batch at the same weights (GRADIENT_REFERENCES): an fp32 copy of the model's, or the
recipe's own forward's with float32 gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fourbit import tasks
from fourbit.formats import BlockFormat, LogFormat
from fourbit.nn import QLinear, QMatmul, QuantState
from fourbit.nn.gemm import GemmOps, conv_ops, linear_ops, matmul_ops
from fourbit.nn.lstm import QLSTM
from fourbit.nn.quant import operand_scale
from fourbit.nn.spec import OperandSpec
from fourbit.train import RunConfig, _Run, _StopSignals, load_checkpoint, run_data, run_model, train_step

POINTS = ("W", "B", "A", "G_dx", "G_dw")
# what GradientFidelity compares the recipe's weight gradients against
GRADIENT_REFERENCES = {
    # the whole recipe's effect: early in training mostly the gradient quantizers'; near
    # convergence the 4-bit forward's own gradient differs from fp32's by more than that
    "fp32": "an fp32 copy of the model",
    # the gradient quantizers' effect alone (with what each dX error adds on the way down)
    "own-forward": "the recipe's own forward with float32 gradients",
}
HIST_LOW, HIST_HIGH, HIST_WIDTH = -40.0, 4.0, 0.25  # log2 |g| bins of grad_hist


def _finite_or_none(v: float) -> float | None:
    """JSON has no inf / NaN: null stands for them."""
    return v if math.isfinite(v) else None


def sqnr_db(signal: float, noise: float) -> float | None:
    if noise == 0 or signal == 0:
        return None
    return 10 * math.log10(signal / noise)


@dataclass
class OperandStats:
    """Running float64 sums for one operand of one layer (see the module docstring)."""

    elements: int = 0
    nonzero: int = 0
    clipped: int = 0
    flushed: int = 0
    nonfinite: int = 0
    sum_x2: float = 0.0
    sum_e2: float = 0.0
    sum_e: float = 0.0
    sum_abs: float = 0.0
    per_step: dict[int, list[float]] = field(default_factory=dict)  # step -> [Σx², Σe²]
    gradscales: list[float] = field(default_factory=list)

    def add(self, x: Tensor, q: Tensor, lo, hi, step: int) -> None:
        """One call's operand: x (float32) and q, `lo` / `hi` numbers or per-element tensors."""
        x, q = x.detach().reshape(-1), q.detach().reshape(-1)
        x64 = x.double()
        lo, hi = (b.to(x.device, torch.float64).reshape(-1) if isinstance(b, Tensor) else b for b in (lo, hi))
        self.elements += x.numel()
        self.clipped += int(torch.count_nonzero((x64 < lo) | (x64 > hi)))
        e = q.double() - x64  # finite exactly where x and q both are
        x2, e2 = float(torch.dot(x64, x64)), float(torch.dot(e, e))
        if not math.isfinite(x2 + e2):  # (float32 values cannot overflow these float64 sums)
            finite = torch.isfinite(e)
            self.nonfinite += finite.numel() - int(torch.count_nonzero(finite))
            x, q, x64, e = x[finite], q[finite], x64[finite], e[finite]
            x2, e2 = float(torch.dot(x64, x64)), float(torch.dot(e, e))
        nonzero = x != 0
        self.nonzero += int(torch.count_nonzero(nonzero))
        self.flushed += int(torch.count_nonzero(nonzero & (q == 0)))
        self.sum_x2 += x2
        self.sum_e2 += e2
        self.sum_e += float(e.sum())
        self.sum_abs += float(torch.linalg.vector_norm(x64, 1))
        sums = self.per_step.setdefault(step, [0.0, 0.0])
        sums[0] += x2
        sums[1] += e2

    def summary(self) -> dict:
        out = {
            "elements": self.elements,
            "sqnr_db": sqnr_db(self.sum_x2, self.sum_e2),
            "clipped": self.clipped / max(self.elements, 1),
            "flushed": self.flushed / max(self.nonzero, 1),
            "bias": _finite_or_none(self.sum_e / self.sum_abs) if self.sum_abs else 0.0,
            "nonfinite": self.nonfinite,
            "sqnr_db_per_step": [sqnr_db(*self.per_step[s]) for s in sorted(self.per_step)],
        }
        if self.gradscales:
            g = self.gradscales
            out["gradscale"] = {"last": g[-1], "min": min(g), "max": max(g)}
        return out


def _block_range(fmt: BlockFormat, x: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """Per element ±(largest element value × its block's scale): every element code set to
    the top one, decoded with the block scales x gets (they do not depend on rounding)."""
    shape = x.shape
    if len(fmt.block_shape) == 2 and x.ndim > 2:  # conv weights tile as [out, in·kernel]
        x = x.reshape(x.shape[0], -1)
    enc = fmt.encode(x, axis=axis)
    top_code = fmt.element.encode(torch.tensor(fmt.element.max_value()))
    hi = fmt.decode(enc._replace(codes=torch.full_like(enc.codes, int(top_code)))).reshape(shape)
    return -hi, hi


def grid_range(spec: OperandSpec, x: Tensor, phase: int, axis: int, pact=None):
    """(lo, hi): the smallest and largest value x's grid produces (numbers, or per-element
    tensors for block formats); see `clipped` in the module docstring."""
    fmt = spec.fmt
    if fmt is None:
        return -math.inf, math.inf
    if isinstance(fmt, BlockFormat):
        return _block_range(fmt, x, axis)
    if spec.scaler == "pact":
        fmt = pact.grid
        scale = float(pact.clip_level()) / fmt.qmax
    else:
        scale = operand_scale(spec, x, axis)
    values = fmt.values(phase=phase)
    if isinstance(scale, Tensor) and scale.numel() > 1:  # row scales: per element
        return (float(values[0]) * scale).expand(x.shape), (float(values[-1]) * scale).expand(x.shape)
    return float(values[0]) * float(scale), float(values[-1]) * float(scale)


def _ops(module: nn.Module) -> GemmOps:
    """The GEMM family of a quantized module: where each operand's reduction axis is."""
    if isinstance(module, QMatmul):
        return matmul_ops()
    if isinstance(module, (QLinear, QLSTM)):
        return linear_ops()
    kernel = math.prod(module.kernel_size)
    return conv_ops(module._dims, module.stride, module.padding, module.dilation, module.groups, kernel)


def _rows(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    return x.reshape(-1, x.shape[-1]).double(), g.reshape(-1, g.shape[-1]).double()


def _row_terms(x: Tensor, g: Tensor) -> float:
    """Σ_t ‖g_t‖²‖x_t‖² over the rows t of x [..., in] and g [..., out]."""
    x2d, g2d = _rows(x, g)
    return float((x2d.square().sum(1) * g2d.square().sum(1)).sum())


def _row_sums(x: Tensor, g: Tensor) -> tuple[float, float]:
    """(‖Σ_t g_t x_tᵀ‖², Σ_t ‖g_t‖²‖x_t‖²) over the rows t of x [..., in] and g [..., out]."""
    x2d, g2d = _rows(x, g)
    return float((g2d.T @ x2d).square().sum()), _row_terms(x2d, g2d)


class LayerProbe:
    """The observer of one QuantState: adds each operand it is shown to its stats.

    For a QLinear (no Hadamard turn), also the coherence over the rows t of the dW GEMM's sum
    Σ_t x_t g_tᵀ (see GradientFidelity), with x the layer's input before quantization: of the
    gradient g = s·dY it is given, and of its rounding error g = Q(s·dY) − s·dY. An error whose
    coherence is 1 adds up like noise; above 1 it adds up as the gradient does."""

    def __init__(self, name: str, kind: str, state: QuantState, ops: GemmOps, recorder: Recorder):
        self.name, self.kind, self.state, self.ops, self.recorder = name, kind, state, ops, recorder
        self.stats: dict[str, OperandStats] = {}
        self.dw_coherence = kind == "QLinear" and not state.spec.hadamard_dw
        self.inputs: list[Tensor] = []  # the inputs of this step's forwards, popped by their backwards
        self.inputs_step = -1
        self.coherence_sums = [0.0, 0.0, 0.0, 0.0]  # gradient ‖Σ‖², Σ‖·‖²; error ‖Σ‖², Σ‖·‖²
        bins = round((HIST_HIGH - HIST_LOW) / HIST_WIDTH)
        self.hist = torch.zeros(bins, dtype=torch.int64)
        self.hist_zero = self.hist_below = self.hist_above = 0

    def _where(self, point: str):
        """(operand spec, phase, reduction axis, PACT) of a quantization point."""
        spec, ops, st = self.state.spec, self.ops, self.state
        phase_dx, phase_dw = spec.phases()
        return {
            "A": (st.activation("a"), 0, ops.a_fwd, st.pact_a),
            "W": (spec.weight, 0, ops.b_fwd, None),
            "B": (st.activation("b"), 0, ops.b_fwd, st.pact_b),
            "G_dx": (spec.grad_dx, phase_dx, ops.g_da, None),
            "G_dw": (spec.grad_dw, phase_dw, ops.g_db, None),
        }[point]

    def __call__(self, point: str, x: Tensor, q: Tensor, gradscale: float | None) -> None:
        spec, phase, axis, pact = self._where(point)
        with torch.no_grad():
            lo, hi = grid_range(spec, x, phase, axis, pact)
            stats = self.stats.setdefault(point, OperandStats())
            stats.add(x, q, lo, hi, self.recorder.step)
            if gradscale is not None:
                stats.gradscales.append(gradscale)
            if point == "G_dx":
                self._histogram(x)
            if self.dw_coherence:
                self._coherence(point, x, q)

    def _coherence(self, point: str, x: Tensor, q: Tensor) -> None:
        if self.inputs_step != self.recorder.step:  # (a forward with no backward left one behind)
            self.inputs, self.inputs_step = [], self.recorder.step
        if point == "A":
            self.inputs.append(x.detach())
        elif point == "G_dw" and self.inputs:  # backwards run in the reverse order of forwards
            a = self.inputs.pop()
            for k, g in ((0, x), (2, q - x)):
                num, den = _row_sums(a, g.detach())
                self.coherence_sums[k] += num
                self.coherence_sums[k + 1] += den

    def _histogram(self, g: Tensor) -> None:
        a = g.detach().reshape(-1).abs()
        e = torch.log2(a)  # 0 -> -inf; NaN stays NaN and is counted nowhere
        zero = a.numel() - int(torch.count_nonzero(a))
        self.hist_zero += zero
        self.hist_below += int(torch.count_nonzero(e < HIST_LOW)) - zero
        self.hist_above += int(torch.count_nonzero(e > HIST_HIGH))
        self.hist += torch.histc(e, len(self.hist), HIST_LOW, HIST_HIGH).long().cpu()

    def summary(self) -> dict:
        described = {}
        for point in self.stats:
            spec, phase, _, _ = self._where(point)
            phased = isinstance(spec.fmt, LogFormat)
            described[point] = spec.describe() + (f", phase {phase}" if phased else "")
        out = {
            "name": self.name,
            "kind": self.kind,
            "operands": {
                p: {"format": described[p], **self.stats[p].summary()} for p in POINTS if p in self.stats
            },
        }
        gradient2, gradient_rows, error2, error_rows = self.coherence_sums
        if gradient_rows > 0:
            out["dw_coherence"] = {
                "gradient": gradient2 / gradient_rows,
                "error": error2 / error_rows if error_rows > 0 else None,  # (None: no error at all)
            }
        if "G_dx" in self.stats:
            out["grad_hist"] = {
                "log2_low": HIST_LOW,
                "width": HIST_WIDTH,
                "counts": self.hist.tolist(),
                "zero": self.hist_zero,
                "below": self.hist_below,
                "above": self.hist_above,
            }
        return out


class Recorder:
    """Attaches a LayerProbe to every quantized layer of `model` for the `with` block.

    with Recorder(model) as rec:
        for rec.step in range(n): ...train one step...
    rec.layers()  # one dict per layer, in model order
    """

    def __init__(self, model: nn.Module):
        self.step = 0
        self.probes: list[LayerProbe] = []
        for name, module in model.named_modules():
            quant = getattr(module, "quant", None)
            if isinstance(quant, QuantState):
                states = [(name, quant)]
            elif isinstance(quant, nn.ModuleDict):  # QLSTM: an input and a recurrent GEMM per cell
                states = [(f"{name}.{k}", s) for k, s in quant.items()]
            else:
                continue
            for state_name, state in states:
                if not state.spec.is_fp32:
                    kind = type(module).__name__
                    self.probes.append(LayerProbe(state_name, kind, state, _ops(module), self))

    def __enter__(self) -> Recorder:
        for p in self.probes:
            p.state.observer = p
        return self

    def __exit__(self, *exc) -> None:
        for p in self.probes:
            p.state.observer = None

    def layers(self) -> list[dict]:
        return [p.summary() for p in self.probes]


# -- fourbit inspect ---------------------------------------------------------------------------


def _check_reference(reference: str) -> None:
    if reference not in GRADIENT_REFERENCES:
        raise ValueError(f"unknown gradient reference {reference!r}; known: {', '.join(GRADIENT_REFERENCES)}")


def reference_model(model: nn.Module, task, reference: str) -> nn.Module:
    """The model GradientFidelity runs beside `model` (converted, of `task`) as `reference`
    (a GRADIENT_REFERENCES key) says."""
    _check_reference(reference)
    if reference == "fp32":
        with torch.random.fork_rng(devices=[]):  # building a model draws init weights: not the run's RNG
            return task.build_model()
    shadow = copy.deepcopy(model)  # own-forward
    for state in shadow.modules():
        if isinstance(state, QuantState):
            state.unquantize_gradients()
    return shadow


def inspect_recipe(
    cfg: RunConfig, steps: int, out: Path, progress: bool = False, resume: bool = False,
    reference: str = "fp32",
) -> dict:  # fmt: skip
    """The first `steps` training steps of `fourbit train` with `cfg` (same model init, data
    order and augmentation), recorded; nothing is written. `resume`: the next `steps` steps
    of the run whose checkpoint is `out`/checkpoint.pt instead (its weights, optimizer and
    place in the data order). `reference`: what the weight gradients are compared against,
    a GRADIENT_REFERENCES key."""
    t0 = time.perf_counter()
    run = _Run(cfg, out, progress=False, resume=resume)
    left = run.steps_per_epoch - run.pos.step
    if steps > left:
        raise ValueError(f"--steps {steps} exceeds the {left} steps left in the epoch")
    loader, aug = run.next_batches()
    fidelity = GradientFidelity(run.model, reference_model(run.model, run.task, reference))
    run.model.train()
    losses, reference_losses, skipped = [], [], 0
    with Recorder(run.model) as rec:
        for rec.step, batch in zip(range(steps), loader, strict=False):
            batch = run.task.augment(batch, aug)
            fidelity.reference(run.task, batch)
            reference_losses.append(_finite_or_none(fidelity.reference_loss))
            loss, _, why = train_step(run.model, run.opt, run.sched, run.task, batch, run.guard)
            losses.append(_finite_or_none(loss))
            skipped += why is not None
            if why is None:
                fidelity.compare()
            if progress:
                print(f"  {cfg.recipe} step {rec.step + 1}/{steps}: loss {loss:.4f}", flush=True)
    return {
        "recipe": cfg.recipe,
        "seed": cfg.seed,
        "from": {"epoch": run.pos.epoch, "step": run.pos.step},  # where in training the steps began
        "steps": len(losses),
        "batch_size": run.cfg.batch_size,
        "losses": losses,
        "reference_losses": reference_losses,  # the gradient reference's, on the same batches
        "skipped_steps": skipped,
        "wall_time_s": time.perf_counter() - t0,
        "layers": rec.layers(),
        "gradients": fidelity.summary(),
    }


def _checkpointed_config(task: str, recipe: str, runs: Path) -> RunConfig:
    """The RunConfig of the run checkpointed in `runs`/`recipe` (a `fourbit compare --out`)."""
    path = runs / recipe / "checkpoint.pt"
    cfg = RunConfig(**load_checkpoint(path, mmap=True)["config"])  # (_Run reads the tensors)
    if cfg.task != task:
        raise ValueError(f"{path} is a checkpoint of task {cfg.task!r}, not {task!r}")
    return cfg


def inspect(
    task: str,
    recipes: list[str],
    steps: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
    train_limit: int | None = None,
    data_dir: str | None = None,
    out: Path = Path("."),
    progress: bool = False,
    runs: Path | None = None,
    reference: str = "fp32",
) -> dict:
    """inspect_recipe for each recipe: the dict written to inspect.json. `runs`: a folder
    of `fourbit compare` (`runs`/RECIPE/checkpoint.pt): each recipe's next steps from its
    checkpoint, under its own settings (seed, batch size, train limit), not the first ones.
    `reference`: what the weight gradients are compared against (GRADIENT_REFERENCES)."""
    if steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    _check_reference(reference)  # before any recipe runs
    if runs is None:
        configs = [  # (test_limit 1: the test split is loaded by the run but not used)
            RunConfig(task, r, seed=seed, batch_size=batch_size, train_limit=train_limit, test_limit=1,
                      data_dir=data_dir)
            for r in recipes
        ]  # fmt: skip
        folders = [out] * len(configs)
    else:
        configs = [_checkpointed_config(task, r, runs) for r in recipes]
        folders = [runs / r for r in recipes]
        seed, train_limit = configs[0].seed, configs[0].train_limit  # (each recipe's: in its result)
    return {
        "format": "fourbit-inspect",
        "version": 1,
        "task": task,
        "seed": seed,
        "train_limit": train_limit,
        "aggregation": "sums over every GEMM call of every step, pooled (per-step SQNR also given)",
        "runs": None if runs is None else str(runs),
        "gradient_reference": reference,
        "recipes": {
            c.recipe: inspect_recipe(c, steps, folder, progress, resume=runs is not None, reference=reference)
            for c, folder in zip(configs, folders, strict=True)
        },
    }


def _fidelity_line(rows: list[dict], reference: str) -> str:
    """The end-to-end gradient error in one line: median and worst over the weight matrices
    and kernels (a bias or norm parameter whose reference gradient is ~0, e.g. a bias before
    a BatchNorm, would make any error look like -100 dB)."""
    weights = [r for r in rows if r["ndim"] >= 2]
    finite = sorted((r for r in weights if r["sqnr_db"] is not None), key=lambda r: r["sqnr_db"])
    zero_reference = sum(r["sqnr_db"] is None and r["cosine"] is None for r in weights)
    against = f"gradients against {GRADIENT_REFERENCES[reference]}"
    also = f"; {zero_reference} with a zero reference gradient" if zero_reference else ""
    if not finite:
        exact = len(weights) - zero_reference
        return f"{against}: exact for {exact} of {len(weights)} weight tensors{also}"
    median = finite[len(finite) // 2]["sqnr_db"]
    worst = finite[0]
    return (
        f"{against} ({len(weights)} weight tensors): SQNR median {median:.1f} dB, "
        f"lowest {worst['sqnr_db']:.1f} dB ({worst['name']}, cosine {worst['cosine']:.3f}){also}"
    )


def _loss(value: float | None) -> str:
    return "nan" if value is None else f"{value:.3f}"


def format_report(result: dict) -> str:
    """A table per recipe: one row per layer and operand."""
    lines = []
    for recipe, r in result["recipes"].items():
        lines.append(
            f"\n{result['task']} / {recipe}: {r['steps']} steps of batch {r['batch_size']}, "
            f"loss {_loss(r['losses'][0])} -> {_loss(r['losses'][-1])} (the gradient reference's "
            f"{_loss(r['reference_losses'][0])} -> {_loss(r['reference_losses'][-1])}), "
            f"{r['wall_time_s']:.1f} s"
        )
        lines.append(_fidelity_line(r.get("gradients", []), result.get("gradient_reference", "fp32")))
        header = f"{'layer':<28}{'op':<6}{'format':<30}{'SQNR dB':>8}{'clip %':>8}{'flush %':>8}"
        header += f"{'bias %':>8}{'log2 s':>8}"
        lines += [header, "-" * len(header)]
        for layer in r["layers"]:
            for point, o in layer["operands"].items():
                sq = "inf" if o["sqnr_db"] is None else f"{o['sqnr_db']:.1f}"
                bias = "nan" if o["bias"] is None else f"{100 * o['bias']:+.2f}"
                gs = f"{math.log2(o['gradscale']['last']):.0f}" if "gradscale" in o else ""
                lines.append(
                    f"{layer['name'][:27]:<28}{point:<6}{o['format'][:29]:<30}{sq:>8}"
                    f"{100 * o['clipped']:>8.2f}{100 * o['flushed']:>8.2f}{bias:>8}{gs:>8}"
                )
    return "\n".join(lines)


# -- shadows: a reference copy of the model run on the same weights and batches -------------


def _load_shared_state(shadow: nn.Module, model: nn.Module) -> None:
    """Load into `shadow` the entries of the model's state it has: all of them for a copy of
    the converted model; for an unconverted build (same names), all but the quantizers'."""
    mine = shadow.state_dict()
    shadow.load_state_dict({k: v for k, v in model.state_dict().items() if k in mine})


def _shadow_pairs(model: nn.Module, shadow: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(shadow parameter, model parameter) by name, after loading the model's state into
    `shadow`."""
    _load_shared_state(shadow, model)
    params = dict(model.named_parameters())
    return [(p, params[n]) for n, p in shadow.named_parameters()]


def _copy_weights(pairs: list[tuple[nn.Parameter, nn.Parameter]]) -> None:
    with torch.no_grad():
        for mine, theirs in pairs:
            mine.copy_(theirs)


class GradientFidelity:
    """The end-to-end error of the recipe's weight gradients: before each recorded step,
    `reference` loads the model's state into `shadow` (an fp32 copy of `model`, or one that
    computes the model's forward with float32 gradients: GRADIENT_REFERENCES) and runs it
    forward and backward on the same batch at the same weights (dropout draws the same
    masks: it runs on a fork of the global RNG the model's step then draws from; a
    stochastic forward quantizer, on the same generator state); after the step, `compare`
    pools, per parameter tensor, Σg_ref², Σ(g − g_ref)² and Σg·g_ref, where g is the gradient
    the optimizer used. Unlike the per-operand SQNR this includes what every layer above adds
    on the way down (dX errors); against fp32, also the quantized forward's effect on the
    gradient.

    For the weight of each Linear (its only user), also the `coherence` of the reference
    gradient dW = Σ_t g_t x_tᵀ over the rows t (tokens, examples) of the layer's input x and
    output gradient g: ‖dW‖² / Σ_t ‖x_t‖²‖g_t‖², with x as the layer receives it (before its
    quantizer). 1 when the rows' terms add like independent noise, as rounding errors do
    (below 1 when they cancel more than that); up to the number of rows when they all point
    one way. It is the factor by which the sum lifts the true gradient over errors that do
    not add up."""

    def __init__(self, model: nn.Module, shadow: nn.Module):
        self.model, self.shadow = model, shadow
        self.pairs = _shadow_pairs(model, shadow)
        self.names = [n for n, _ in shadow.named_parameters()]  # (the order of pairs)
        # per parameter: Σg_ref², Σ(g − g_ref)², Σg·g_ref, Σg², Σ_t ‖x_t‖²‖g_t‖² (Linear weights)
        self.sums = {n: [0.0, 0.0, 0.0, 0.0, 0.0] for n in self.names}
        self.reference_grads: list[Tensor | None] = []
        self.reference_loss = math.nan
        self.row_terms: dict[str, float] = {}  # this step's Σ_t ‖x_t‖²‖g_t‖², per Linear weight
        name_of = {id(p): n for n, p in shadow.named_parameters()}
        users = Counter(id(p) for m in shadow.modules() for p in m.parameters(recurse=False))
        for module in shadow.modules():
            if isinstance(module, nn.Linear) and users[id(module.weight)] == 1:
                module.register_forward_hook(self._row_terms_hook(name_of[id(module.weight)]))

    def _row_terms_hook(self, name: str):
        def forward_hook(module, inputs, output):
            if not output.requires_grad:
                return
            x = inputs[0].detach()

            def on_output_grad(g):  # (‖dW‖² itself comes from the parameter's gradient)
                self.row_terms[name] = self.row_terms.get(name, 0.0) + _row_terms(x, g)

            output.register_hook(on_output_grad)

        return forward_hook

    def reference(self, task, batch) -> None:
        _load_shared_state(self.shadow, self.model)
        self.shadow.train()
        self.shadow.zero_grad(set_to_none=True)
        self.row_terms = {}
        with torch.random.fork_rng(devices=[]):
            loss, _ = task.loss(self.shadow, batch)
            loss.backward()
        self.reference_loss = float(loss.detach())
        self.reference_grads = [p.grad for p, _ in self.pairs]

    def compare(self) -> None:
        for name, ref, (_, theirs) in zip(self.names, self.reference_grads, self.pairs, strict=True):
            if ref is None or theirs.grad is None:
                continue
            r, g = ref.double(), theirs.grad.double()
            s = self.sums[name]
            s[0] += float(r.square().sum())
            s[1] += float((g - r).square().sum())
            s[2] += float((g * r).sum())
            s[3] += float(g.square().sum())
            s[4] += self.row_terms.get(name, 0.0)

    def summary(self) -> list[dict]:
        """Per parameter tensor: sqnr_db of its gradient against the reference's, and their
        cosine. sqnr_db null: no error (cosine 1), or a reference gradient of exactly 0 (cosine
        null: the recipe's gradient is not, e.g. a PACT clip nothing reached in the reference).
        coherence: Linear weights only, else null."""
        rows = []
        ndims = dict(zip(self.names, (p.ndim for p, _ in self.pairs), strict=True))
        for name, (ref2, err2, dot, g2, row_terms) in self.sums.items():
            if ref2 == 0 and g2 == 0:
                continue  # no gradient reached it (e.g. an unused parameter)
            cosine = dot / math.sqrt(ref2 * g2) if ref2 > 0 and g2 > 0 else None
            rows.append(
                {
                    "name": name,
                    "ndim": ndims[name],
                    "sqnr_db": sqnr_db(ref2, err2),
                    "cosine": None if cosine is None else _finite_or_none(cosine),
                    "coherence": ref2 / row_terms if row_terms > 0 else None,
                }
            )
        return rows


# -- BatchNorm drift against an fp32 shadow ----------------------------------------------------


def _batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def bn_distance(bn: nn.Module, reference: nn.Module) -> tuple[float, float]:
    """(mean drift, var drift) of `bn`'s running statistics against `reference`'s:
    mean: RMS over channels of (μ − μ_ref) / sqrt(σ²_ref + eps), the running mean's shift in
    units of the reference's std (what it moves BN's normalized output by);
    var: RMS over channels of (σ² − σ²_ref) / (σ²_ref + eps). Both 0 when they agree."""
    mu, var = bn.running_mean.double(), bn.running_var.double()
    mu_ref, var_ref = reference.running_mean.double(), reference.running_var.double()
    denom = var_ref + bn.eps
    mean_drift = ((mu - mu_ref).square() / denom).mean().sqrt()
    var_drift = ((var - var_ref) / denom).square().mean().sqrt()
    return float(mean_drift), float(var_drift)


class ShadowBN:
    """An fp32 copy of `model` that sees each training batch with the model's current
    weights, so its BatchNorm running statistics are the ones fp32 arithmetic would have
    accumulated on the same weights and batches. A forward pre-hook on `model` runs it
    (training forwards only: with grad, in train mode) and records the drift every
    `every` batches, before the batch updates either."""

    def __init__(self, model: nn.Module, fp32_model: nn.Module, every: int):
        self.model, self.shadow, self.every = model, fp32_model, every
        self.pairs = _shadow_pairs(model, fp32_model)
        self.bns = _batchnorms(model)
        self.shadow_bns = _batchnorms(fp32_model)
        if not self.bns:
            raise ValueError("the model has no BatchNorm layer: nothing to track")
        self.batches = 0
        self.records: list[dict] = []
        self.handle = model.register_forward_pre_hook(self._before_forward)

    def measure(self) -> None:
        layers = {n: bn_distance(bn, self.shadow_bns[n]) for n, bn in self.bns.items()}
        self.records.append(
            {
                "step": self.batches,
                "mean_drift": {n: d[0] for n, d in layers.items()},
                "var_drift": {n: d[1] for n, d in layers.items()},
            }
        )

    def _before_forward(self, module, args) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation, or the training loop rerunning a bad step's forward
        if self.batches % self.every == 0:
            self.measure()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the run's RNG untouched
            _copy_weights(self.pairs)
            self.shadow.train()
            self.shadow(*args)
        self.batches += 1

    def close(self) -> list[dict]:
        self.handle.remove()
        if not self.records or self.records[-1]["step"] != self.batches:
            self.measure()
        return self.records


def bn_drift_recipe(cfg: RunConfig, out: Path, every: int, progress: bool = False) -> dict:
    """Train as `fourbit train` would (metrics, checkpoint and summary in `out`) with a
    ShadowBN attached: the drift records and the run's summary."""
    run = _Run(cfg, out, progress)
    with torch.random.fork_rng(devices=[]):  # building the copy draws init weights: not the run's RNG
        fp32_model = run.task.build_model()
    shadow = ShadowBN(run.model, fp32_model, every)
    with _StopSignals() as signals:
        while run.pos.epoch < run.cfg.epochs:
            run.train_epoch(signals)
            run.end_epoch()
    records = shadow.close()
    summary = run.write_summary()
    return {
        "recipe": cfg.recipe,
        "metric_name": summary["metric_name"],
        "metric": summary["metric"],
        "history": run.history,
        "wall_time_s": summary["wall_time_s"],
        "records": records,
    }


def bn_drift(configs: Iterable[RunConfig], out: Path, every: int = 10, progress: bool = False) -> dict:
    """bn_drift_recipe for each config (one task, several recipes): the bn_drift.json dict."""
    if every < 1:
        raise ValueError(f"every must be a positive integer; got {every!r}")
    configs = list(configs)
    runs = {c.recipe: bn_drift_recipe(c, out / c.recipe, every, progress) for c in configs}
    c = configs[0]
    return {
        "format": "fourbit-bn-drift",
        "version": 1,
        "task": c.task,
        "seed": c.seed,
        "epochs": c.epochs,
        "train_limit": c.train_limit,
        "every": every,
        "definitions": {
            "mean_drift": "RMS over channels of (mu - mu_fp32) / sqrt(var_fp32 + eps)",
            "var_drift": "RMS over channels of (var - var_fp32) / (var_fp32 + eps)",
            "fp32 shadow": "running stats of a float32 copy of the current weights fed the same batches",
        },
        "recipes": runs,
    }


def parse_forward(text: str, own: str) -> tuple[str, dict[str, str]]:
    """`RECIPE` or `RECIPE:GLOB=RECIPE[,GLOB=RECIPE...]` (convert's policy) as (recipe,
    policy); `own` stands for the run's recipe."""
    recipe, colon, rest = text.partition(":")
    policy = {}
    for item in rest.split(","):
        glob, eq, value = item.partition("=")
        if not (glob and eq and value):
            if colon or item:
                raise ValueError(
                    f"forward {text!r}: write RECIPE or RECIPE:GLOB=RECIPE[,GLOB=RECIPE...], "
                    "e.g. 'own:*.mix=fp32' ('own': the run's recipe)"
                )
            continue
        policy[glob] = own if value == "own" else value
    return (own if recipe == "own" else recipe), policy


def _is_quantizer_state(key: str) -> bool:
    return "quant" in key.split(".")  # a quantized layer's `quant.*`: PACT clips, GradScale, RNG


def load_trained(model: nn.Module, state: dict[str, Tensor], path: Path) -> list[str]:
    """Every weight and buffer of `state` (a checkpoint's model) into `model`, which may be
    converted to another recipe: quantizer state only where `model` has the same. The
    quantizer state keys `model` has and `state` lacks (they start as in training)."""
    mine = model.state_dict()
    missing = [k for k in mine if not _is_quantizer_state(k) and k not in state]
    extra = [k for k in state if not _is_quantizer_state(k) and k not in mine]
    if missing or extra:
        raise ValueError(
            f"{path} holds another model: missing {missing[:3]}, unexpected {extra[:3]}; "
            "evaluate a checkpoint of this task's model"
        )
    load = {
        k: v
        for k, v in state.items()
        if k in mine and (not _is_quantizer_state(k) or v.shape == mine[k].shape)
    }
    model.load_state_dict(load, strict=False)
    return [k for k in mine if k not in load]


def recalibrate_batchnorm(model: nn.Module, task: tasks.Task, batches: Iterable) -> int:
    """Every BatchNorm's running mean and variance re-estimated under the model's forward as
    it now is: reset, then the plain average over `batches` of each batch's statistics
    (forward passes without gradients, every other module in eval mode). The batches used."""
    norms = [m for m in _batchnorms(model).values() if m.track_running_stats]
    if not norms:
        raise ValueError("the model has no BatchNorm with running statistics to recalibrate")
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch weighs the same
        m.train()
    used = 0
    with torch.no_grad():
        for batch in batches:
            task.loss(model, batch)
            used += 1
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    return used


def evaluate_as(
    run: Path,
    forwards: list[str],
    progress: bool = False,
    recalibrate: int = 0,
    baseline: Path | None = None,
    resamples: int = 1000,
) -> dict:
    """The test metrics of the weights checkpointed in `run`/checkpoint.pt under each of
    `forwards` (parse_forward: a recipe, maybe with a per-layer policy), on the run's test
    set. Against each other they split a quantized run's gap to fp32 in two: its forward's
    cost at evaluation (`own` against `fp32` on the same weights) and the cost of having
    been trained quantized (`fp32` here against an fp32 run); policies say which layers
    carry the first. Quantizer state the run does not have (a PACT clip under a recipe it
    did not train with) starts as in training: from the first test batch. `recalibrate`
    N > 0: before scoring, each forward's BatchNorm statistics re-estimated over the first N
    training batches (in order, not augmented), since the run's were gathered under its own
    forward.

    `baseline`: another run of the same task (say the fp32 run), scored under its own
    recipe on the same test examples. `resamples` > 0: each metric gets a bootstrap
    interval over the test examples (`tasks.bootstrap`, 95 %), and each row its difference
    to the baseline, or without one to the first forward, with the paired interval."""
    if not isinstance(recalibrate, int) or recalibrate < 0:
        raise ValueError(f"recalibrate must be a number of batches >= 0; got {recalibrate!r}")
    if not isinstance(resamples, int) or resamples < 0:
        raise ValueError(f"resamples must be a number of bootstrap draws >= 0; got {resamples!r}")
    path = run / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    trained = RunConfig(**ckpt["config"])
    task = tasks.get(trained.task)
    cfg = trained.resolved(task)
    other = None
    if baseline is not None:
        other = load_checkpoint(baseline / "checkpoint.pt")
        other_cfg = RunConfig(**other["config"])
        if other_cfg.task != trained.task:
            raise ValueError(f"the baseline {baseline} is a {other_cfg.task} run, {run} a {trained.task} run")
    train_set, test_loader = run_data(task, cfg)
    parsed = [parse_forward(f, trained.recipe) for f in forwards]  # every error before any evaluation
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, collate_fn=task.collate)

    def score(c: RunConfig, policy: dict, state: dict, where: Path) -> tuple[dict, Tensor]:
        t0 = time.perf_counter()
        model = run_model(task, c, train_set, policy)
        fresh = load_trained(model, state, where)
        if recalibrate:
            recalibrate_batchnorm(model, task, itertools.islice(train_loader, recalibrate))
        model.eval()
        with torch.no_grad():
            metrics, counts = task.evaluate_examples(model, test_loader)
        row = {"metrics": metrics, "fresh_quantizer_state": fresh, "wall_time_s": time.perf_counter() - t0}
        return row, counts

    reference = None
    result = {
        "format": "fourbit-evaluate",
        "version": 2,
        "run": str(run),
        "task": trained.task,
        "trained_recipe": trained.recipe,
        "progress": ckpt["progress"],  # where in training the weights are
        "recalibrate_batches": recalibrate,
        "metric_name": task.metric_name,
        "bootstrap_resamples": resamples,
    }
    if other is not None:
        # (the baseline's own recipe and seed build its model; the test batches are the run's)
        row, reference = score(other_cfg.resolved(task), {}, other["model"], baseline / "checkpoint.pt")
        row = {"run": str(baseline), "recipe": other_cfg.recipe, "progress": other["progress"], **row}
        if resamples:
            row["bootstrap"] = tasks.bootstrap(task, reference, resamples=resamples)
        result["baseline"] = row
        if progress:
            print(_evaluate_line(f"baseline {other_cfg.recipe}", row, task.metric_name), flush=True)
    results = []
    for forward, (recipe, policy) in zip(forwards, parsed, strict=True):
        row, counts = score(dataclasses.replace(cfg, recipe=recipe), policy, ckpt["model"], path)
        row = {"forward": forward, "recipe": recipe, "policy": policy, **row}
        if resamples:
            row["bootstrap"] = tasks.bootstrap(task, counts, reference, resamples)
        reference = counts if reference is None else reference
        results.append(row)
        if progress:
            print(_evaluate_line(forward, row, task.metric_name), flush=True)
    result["results"] = results
    return result


def _evaluate_line(label: str, row: dict, metric_name: str) -> str:
    """The label, then the metrics, the task's own first (with its bootstrap interval and
    difference to the reference, when there is one)."""
    metrics = row["metrics"]
    text = f"{label:<40} {metric_name} {metrics[metric_name]:.4g}"
    b = row.get("bootstrap")
    if b is not None:
        text += f" [{b['low']:.4g}, {b['high']:.4g}]"
        if "delta" in b:
            text += f"  Δ {b['delta']:+.3g} [{b['delta_low']:+.3g}, {b['delta_high']:+.3g}]"
    return text + "".join(f"  {k} {v:.4g}" for k, v in metrics.items() if k != metric_name)


__all__ = [
    "Recorder",
    "ShadowBN",
    "bn_distance",
    "bn_drift",
    "evaluate_as",
    "format_report",
    "grid_range",
    "inspect",
    "recalibrate_batchnorm",
]
