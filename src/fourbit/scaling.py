"""How a scale is chosen: SAWB (weights), PACT (activations), MSE-optimal clip, Max, GradScale
(gradients).

A scale maps a tensor onto a format's unit grid: `fmt.quantize(x, scale)`. The scalers
here return float32 scalar tensors and never call `.item()`, so they add no host sync
(but for mse_scale's count of |x|, which reads its size back once on a GPU).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fourbit.formats import Format, IntFormat

# SAWB clip coefficients alpha = c1·sqrt(E[w²]) + c2·E[|w|], by bit width. Source: IBM's
# fit (Choi et al. 2018, "Bridging the accuracy gap for 2-bit quantized neural networks",
# as used by Sun et al. 2020). Only the 4-bit fit is published with the 4-bit scheme.
SAWB_COEFFICIENTS: dict[int, tuple[float, float]] = {4: (12.68, -12.80)}


def _amax(x: Tensor, dim: int | None = None) -> Tensor:
    if dim is not None:  # (the sum of an empty axis is its max of 0: amax refuses one)
        a = x.detach().abs()
        return (a.amax(dim, keepdim=True) if x.shape[dim] else a.sum(dim, keepdim=True)).float()
    return x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)


def max_scale(x: Tensor, fmt: Format, dim: int | None = None) -> Tensor:
    """Current scaling: the scale that maps max |x| onto the format's largest value (1 if x == 0).

    `dim`: one scale per slice along `dim` (max over that axis, kept as a size-1 axis)."""
    amax = _amax(x, dim)
    return torch.where(amax > 0, amax / fmt.max_value(), torch.ones_like(amax))


def sawb_scale(
    w: Tensor, fmt: IntFormat, coefficients: tuple[float, float] | None = None, dim: int | None = None
) -> Tensor:
    """SAWB: clip alpha = c1·sqrt(mean(w²)) + c2·mean(|w|); scale = alpha / qmax.

    The fit assumes bell-shaped weights; where it gives alpha <= 0 (e.g. every |w| equal)
    the clip falls back to max |w|, and an all-zero tensor gets scale 1. `dim`: one scale
    per slice along `dim` (the means over that axis, kept as a size-1 axis), each fitted
    and falling back on its own.
    """
    if coefficients is None:
        if fmt.bits not in SAWB_COEFFICIENTS:
            raise ValueError(
                f"no published SAWB coefficients for {fmt.bits} bits (have {sorted(SAWB_COEFFICIENTS)}); "
                "pass coefficients=(c1, c2)"
            )
        coefficients = SAWB_COEFFICIENTS[fmt.bits]
    c1, c2 = coefficients
    if w.numel() == 0 and dim is None:
        return torch.ones((), device=w.device)
    w64 = w.detach().double()  # float64 statistics: w² of a finite float32 cannot overflow
    axes = {} if dim is None else {"dim": dim, "keepdim": True}
    alpha = (c1 * w64.square().mean(**axes).sqrt() + c2 * w64.abs().mean(**axes)).float()
    alpha = torch.where(alpha > 0, alpha, _amax(w, dim))
    return torch.where(alpha > 0, alpha / fmt.qmax, torch.ones_like(alpha))


MSE_CLIP_CANDIDATES = 1024  # clips tried by mse_scale: amax·j/1024, j = 1 ... 1024


def mse_scale(x: Tensor, fmt: IntFormat, candidates: int = MSE_CLIP_CANDIDATES) -> Tensor:
    """The clip alpha that minimizes x's estimated quantization MSE on fmt's grid; scale = alpha / qmax.

    The estimate is OCTAV's (Sakr et al. 2022): a nonzero value inside the clip costs the
    rounding noise step²/12 (step = alpha / qmax), one beyond it (|x| - alpha)², an exact
    0 nothing (every grid holds it). Where SAWB's published fit approximates this optimum
    for bell-shaped tensors, this finds it for any shape: a ReLU output, half of it exactly
    0, is not one (and on the unsigned grid 0 ... 15 SAWB's clip is the signed grid's,
    fitted for 7 steps a side, not 15). The candidates alpha_j = amax·j/n, j = 1 ... n
    (n = `candidates`) are all scored from one count of |x| in the n bins between them,
    each value counted at its bin's middle (amax/2n from its place at most), so the minimum
    found is the global one on that grid of clips; the first of equal minima wins. An
    all-zero tensor gets scale 1; a tensor with NaN or inf, a NaN scale. (On a GPU, the
    count reads its size back once.)
    """
    n = candidates
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"candidates must be a positive integer; got {n!r}")
    a = x.detach().reshape(-1).float().abs()
    amax = a.amax() if a.numel() else a.new_zeros(())
    usable = torch.where(torch.isfinite(amax) & (amax > 0), amax, 1.0)
    # bin k: amax·k/n <= |x| < amax·(k+1)/n (|x| = amax in the last); clip j keeps bins < j
    # (NaN and inf land in some bin after the clamp: the scale is NaN then, whatever the bins)
    count = torch.bincount((a * (n / usable)).long().clamp_(0, n - 1), minlength=n).double()
    count[0] -= a.numel() - (a > 0).sum()  # exact zeros (all in bin 0) cost no noise
    # in units of the bin width: bin k's middle m_k = k + 1/2 lies m_k - j beyond clip j, so
    # the clip error is sum over k >= j of count_k·(m_k - j)², from three suffix sums
    middle = torch.arange(n, dtype=torch.float64, device=a.device) + 0.5
    moments = torch.stack([count, count * middle, count * middle.square()])
    suffix = moments.flip(1).cumsum(1).flip(1)  # column k: bins k ... n-1
    beyond = torch.cat([suffix[:, 1:], suffix.new_zeros(3, 1)], 1)  # column j-1: beyond clip j
    j = middle + 0.5  # clips 1 ... n in bin widths
    inside = count.sum() - beyond[0]
    clip_error = beyond[2] - 2 * j * beyond[1] + j.square() * beyond[0]
    best = (j[(j.square() / (12 * fmt.qmax**2) * inside + clip_error).argmin()] / n).float() * amax
    scale = torch.where(best > 0, best / fmt.qmax, torch.ones_like(best))
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


class _PACTClip(torch.autograd.Function):
    """y = quantize(clip(x, lo, alpha)): straight-through inside the clip, dy/dalpha = 1 at the top."""

    @staticmethod
    def forward(ctx, x, alpha, grid: IntFormat, signed: bool):
        lo = -alpha if signed else torch.zeros_like(alpha)
        y = torch.minimum(torch.maximum(x, lo.to(x.dtype)), alpha.to(x.dtype))
        below = x <= lo if signed else x < lo
        ctx.save_for_backward(x >= alpha, below)
        ctx.signed = signed
        return grid.quantize(y, alpha / grid.qmax)

    @staticmethod
    def backward(ctx, g):
        above, below = ctx.saved_tensors
        dx = torch.where(above | below, torch.zeros_like(g), g)
        dalpha = g[above].sum() - (g[below].sum() if ctx.signed else 0)
        return dx, dalpha.reshape(()).float(), None, None


class InputSign(nn.Module):
    """Whether an activation's INT grid is signed, fixed by the first input seen and kept in
    the state: any negative value -> the symmetric signed grid -2**(bits-1)+1 ... 2**(bits-1)-1
    (PACT) or the signed one (SAWB); none (after a ReLU) -> the unsigned grid
    0 ... 2**bits - 1, which spends no code on negative values that never come. A later
    negative input on an unsigned grid saturates at 0, as any value outside a grid does.
    Until the first input, `signed` is -1 and the grid counts as signed (the grid that
    clips nothing to 0)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("signed", torch.tensor(-1, dtype=torch.int8))  # -1: not yet seen

    @property
    def is_signed(self) -> bool:
        return int(self.signed) != 0

    def observe(self, x: Tensor) -> bool:
        """On the first input seen, fix signedness; return it."""
        if self.signed < 0:
            self.signed.fill_(int(bool((x.detach() < 0).any())))  # (x.min() < 0 would miss it past a NaN)
        return self.is_signed

    def fix(self, signed: bool) -> None:
        """Fix signedness before any input (e.g. LSTM hidden states lie in (-1, 1))."""
        self.signed.fill_(int(signed))


class PACT(InputSign):
    """PACT activation quantizer with a learnable clip alpha (Choi et al. 2018).

    Unsigned input (after ReLU): clip to [0, alpha] on the UINT grid 0 ... 2**bits - 1.
    Signed input (choice): clip to [-alpha, alpha] on the symmetric INT grid. Which one is
    fixed by the first forward pass (any negative value -> signed) and kept in the state.
    `alpha=None` (choice) starts alpha at that first input's max |x| (1 when it is 0).
    Gradients: straight-through for x inside the clip, 0 outside; d/dalpha = 1 where the
    value is clipped at the top (-1 at the bottom when signed).
    """

    def __init__(self, bits: int = 4, alpha: float | None = None):
        super().__init__()
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0 or None; got {alpha!r}")
        self.bits = bits
        self.alpha_from_data = alpha is None
        self.alpha = nn.Parameter(torch.tensor(1.0 if alpha is None else float(alpha)))

    @property
    def grid(self) -> IntFormat:
        if self.signed < 0:
            raise RuntimeError("PACT has not seen an input yet, so its grid is not fixed")
        return IntFormat(self.bits, signed=bool(self.signed), symmetric=bool(self.signed))

    @property
    def scale(self) -> Tensor:
        return self.alpha.detach() / self.grid.qmax

    def observe(self, x: Tensor) -> bool:
        """On the first input seen, fix signedness (and alpha when it starts from data)."""
        first = self.signed < 0
        signed = super().observe(x)
        if first and self.alpha_from_data:
            amax = _amax(x.float())
            with torch.no_grad():
                self.alpha.fill_(amax.item() if 0 < amax < float("inf") else 1.0)
        return signed

    def preset(self, signed: bool, alpha: float) -> None:
        """Fix signedness and alpha before any input (e.g. LSTM hidden states lie in (-1, 1))."""
        self.fix(signed)
        with torch.no_grad():
            self.alpha.fill_(alpha)

    def clip_level(self) -> Tensor:
        """alpha, floored so the scale stays valid should the optimizer push alpha to 0."""
        return self.alpha.clamp(min=1e-8)

    def forward(self, x: Tensor) -> Tensor:
        signed = self.observe(x)
        return _PACTClip.apply(x, self.clip_level(), self.grid, signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


GRADSCALE_RULES = ("adaptive", "current", "none")


class GradScale(nn.Module):
    """Per-layer power-of-two gradient scale, kept across iterations (Sun et al. 2020).

    The gradient is multiplied by the scale before it is quantized onto a grid whose top
    value is `max_value` (M), and divided by it afterwards. Rules:
    - `adaptive` (the paper): this iteration uses the stored scale s; then, with
      m = s · max|g|: m in (M/2, M] keeps s, m <= M/2 doubles it, m > M halves it (the
      values above M saturated this once);
    - `current`: s is the largest power of two with s · max|g| <= M, from this gradient;
    - `none`: s stays at `init` (one fixed global loss scale: the baseline).
    A gradient with NaN/inf halves the scale (back-off); an all-zero one leaves it. Under
    every rule, `nonfinite` counts the gradients with NaN/inf seen: it is where a bad
    gradient enters the layer's quantizer, so the training loop reads it to skip the step.
    (choice) Under `adaptive`, the first nonzero finite gradient sets the starting scale as
    `current` would, so early gradients do not underflow while the scale doubles its way up.
    """

    def __init__(self, rule: str = "adaptive", max_value: float = 1.0, init: float = 1.0):
        super().__init__()
        if rule not in GRADSCALE_RULES:
            raise ValueError(f"rule must be one of {GRADSCALE_RULES}; got {rule!r}")
        if not max_value > 0:
            raise ValueError(f"max_value must be > 0; got {max_value!r}")
        if not init > 0:
            raise ValueError(f"init must be > 0; got {init!r}")
        self.rule, self.max_value = rule, float(max_value)
        self.register_buffer("scale", torch.tensor(float(init)))
        self.register_buffer("started", torch.tensor(False))
        self.register_buffer("nonfinite", torch.tensor(0, dtype=torch.int64))

    def forward(self, amax: Tensor) -> Tensor:
        """The scale for a gradient whose max |g| is `amax`; updates the state for the next one.

        The rule runs on Python floats (exact: every value is a power of two times a float32),
        which costs microseconds where torch scalar ops cost a millisecond per layer and step;
        on a GPU reading `amax` is one host sync."""
        s, M, a = float(self.scale), self.max_value, float(amax)
        finite = math.isfinite(a)
        if not finite:
            self.nonfinite += 1
        if self.rule == "none":
            return self.scale.clone()
        used = new = s
        if not finite:
            new = s / 2
        elif a > 0:
            covering = 2.0 ** (math.frexp(M)[1] - math.frexp(a)[1])  # the `current` scale
            covering = covering if a * covering <= M else covering / 2
            if self.rule == "current":
                used = new = covering
            elif not self.started:
                used = new = covering
                self.started.fill_(True)
            else:
                m = a * s
                new = s / 2 if m > M else s * 2 if m <= M / 2 else s
        used, new = (min(max(v, 2.0**-126), 2.0**126) for v in (used, new))
        self.scale.fill_(new)
        return torch.tensor(used, device=self.scale.device)

    def extra_repr(self) -> str:
        return f"rule={self.rule}, max_value={self.max_value}"


def nonfinite_gradients(model: nn.Module) -> dict[str, Tensor]:
    """Each GradScale's count of non-finite gradients, by the name of the layer it scales.

    The values are the live counters (0-dim int64 tensors): reading them costs no host sync
    until the caller asks for a number."""
    return {
        name.removesuffix("quant.gradscale").rstrip(".") or name: m.nonfinite
        for name, m in model.named_modules()
        if isinstance(m, GradScale)
    }
