"""Fast CPU paths of the quantizers: `kernels.c`, compiled once, called through ctypes.

The C file is plain C with OpenMP (no torch headers), so it builds in about a second with
the system's C compiler; the library is cached under `$FOURBIT_CACHE` (default
~/.cache/fourbit) by a hash of its source, flags and CPU. `make` builds it at install;
otherwise the first use does. Where it cannot be built or loaded (no compiler, another
architecture), and for tensors it does not cover (not CPU float32), the pure-PyTorch
definitions run instead: they are the oracle, and tests/test_fast_paths.py asserts that
both give the same bits. FOURBIT_KERNELS=0 turns the fast path off.

    python -c "from fourbit.formats import kernels; print(kernels.build())"   # what make runs
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels.c")
# -ffp-contract=off: no fused multiply-add, so every product is rounded as torch rounds it;
# -fno-trapping-math: floating-point status flags are never read, so floorf (stochastic
# rounding) vectorizes (values are unchanged: no reassociation, the same rounding mode)
FLAGS = [
    "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC",
    "-shared",
]  # fmt: skip

_f32p = ctypes.POINTER(ctypes.c_float)
_u8p = ctypes.POINTER(ctypes.c_uint8)
_f64p = ctypes.POINTER(ctypes.c_double)
_i64, _int, _f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "fb_int_quantize": (_i64, [_f32p, _i64, _f32, _f32, _f32, _f32, _f32, _f32p, _u8p, _u8p, _int, _int]),
    "fb_int_decode": (None, [_u8p, _i64, _f32, _int, _f32p, _int]),
    "fb_pact_backward": (None, [_f32p, _i64, _u8p, _u8p, _int, _f64p, _f64p, _int]),
    "fb_table_quantize": (
        None,
        [_f32p, _i64, _f32, _f32, _f32p, _f32p, _int, ctypes.c_uint32, _f32p, _f32p, _int],
    ),
    "fb_float_quantize": (None, [_f32p, _i64, _f32, _int, _int, _f32, _f32, _f32p, _f32p, _int]),
    "fb_log_stochastic": (None, [_f32p, _i64, _f32, _int, _int, _int, _f32p, _f32p, _f32p, _int]),
    "fb_block_quantize": (
        None,
        [_f32p, _i64, _i64, _i64, _int, _int, _f32, _int, _f32p, _f32p, _u8p, _u8p, _int],
    ),
    "fb_block_decode": (None, [_u8p, _u8p, _i64, _i64, _i64, _int, _int, _f32, _int, _f32p, _int]),
    "fb_block_quantize_axis": (
        None,
        [_f32p, _i64, _i64, _i64, _int, _f32, _int, _f32p, _f32p, _u8p, _u8p, _int],
    ),
    "fb_block_decode_axis": (None, [_u8p, _u8p, _i64, _i64, _i64, _int, _f32, _int, _f32p, _int]),
    "fb_philox_uniform": (None, [ctypes.c_uint32, ctypes.c_uint32, _i64, _f32p, _int]),
    "fb_abs_max": (_f32, [_f32p, _i64, _int, _int]),
    "fb_clip_with_mask": (None, [_f32p, _i64, _f32, _f32, _int, _f32p, _u8p, _int]),
    "fb_masked": (None, [_f32p, _i64, _u8p, _f32p, _int]),
}
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def library_path() -> Path:
    """Where the compiled library for this source, these flags and this CPU lives."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode())
    digest.update((platform.machine() + _cpu_id()).encode())
    cache = Path(os.environ.get("FOURBIT_CACHE", Path.home() / ".cache" / "fourbit"))
    return cache / "kernels" / f"fourbit-kernels-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile kernels.c (if not cached yet); written to a temp file, then renamed."""
    path = library_path()
    if path.exists():
        return path
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, path)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{e.stderr}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, or not buildable here: warned once)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("FOURBIT_KERNELS", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"fourbit's fast CPU kernels are unavailable, using pure PyTorch: {e}", stacklevel=2)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    _lib = lib
    return _lib


def scalar(scale) -> float | None:
    """`scale` as a Python float when it is one number (a float or a one-element tensor)."""
    if isinstance(scale, Tensor):
        return float(scale) if scale.numel() == 1 and scale.device.type == "cpu" else None
    return float(scale)


def available() -> bool:
    """Whether the kernels are loaded (the one switch: tests turn them off here)."""
    return library() is not None


def applies(x: Tensor) -> bool:
    """Whether the kernels serve `x`: a CPU float32 tensor, and the library is loaded."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


def _ptr(t: Tensor | None, kind):
    return None if t is None else ctypes.cast(t.data_ptr(), kind)


def _threads() -> int:
    return torch.get_num_threads()


def int_quantize(
    x: Tensor,
    scale: float,
    qmin: int,
    qmax: int,
    lo: float = float("-inf"),
    hi: float = float("inf"),
    clip_signed: bool = False,
    codes: bool = False,
    clip_bits: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, int]:
    """(values, nibble-packed codes or None, clip bits or None, number of NaNs) of `x`."""
    x = x.contiguous()
    n = x.numel()
    values = torch.empty_like(x)
    nibbles = torch.empty((n + 1) // 2, dtype=torch.uint8) if codes else None
    clip = torch.empty((n + 7) // 8, dtype=torch.uint8) if clip_bits else None
    nans = library().fb_int_quantize(
        _ptr(x, _f32p), n, scale, lo, hi, qmin, qmax, _ptr(values, _f32p),
        _ptr(nibbles, _u8p), _ptr(clip, _u8p), int(clip_signed), _threads(),
    )  # fmt: skip
    return values, nibbles, clip, nans


def int_decode(nibbles: Tensor, shape: torch.Size, scale: float, signed: bool) -> Tensor:
    out = torch.empty(shape, dtype=torch.float32)
    n, signed = out.numel(), int(signed)
    library().fb_int_decode(_ptr(nibbles, _u8p), n, scale, signed, _ptr(out, _f32p), _threads())
    return out


def pact_backward(d: Tensor, clip_bits: Tensor, nibbles: Tensor, signed: bool) -> tuple[Tensor, float, float]:
    """(d zeroed where clipped, sum of d where clipped at the top, same at the bottom);
    d, a contiguous float32 tensor, is changed in place."""
    top, bottom = ctypes.c_double(), ctypes.c_double()
    library().fb_pact_backward(
        _ptr(d, _f32p), d.numel(), _ptr(clip_bits, _u8p), _ptr(nibbles, _u8p), int(signed),
        ctypes.byref(top), ctypes.byref(bottom), _threads(),
    )  # fmt: skip
    return d, top.value, bottom.value


def table_quantize(
    x: Tensor, tables: list[Tensor], shift: int, mask: int, scale: float = 1.0, premul: float = 1.0
) -> list[Tensor]:
    """copysign(table[(bits(y) >> shift) & mask], y) * scale for y = x * premul / scale,
    one output per table (at most two), in one pass."""
    x = x.contiguous()
    outs = [torch.empty_like(x) for _ in tables]
    t1, o1 = (tables[1], outs[1]) if len(tables) > 1 else (None, None)
    library().fb_table_quantize(
        _ptr(x, _f32p), x.numel(), premul, scale, _ptr(tables[0], _f32p), _ptr(t1, _f32p),
        shift, mask, _ptr(outs[0], _f32p), _ptr(o1, _f32p), _threads(),
    )  # fmt: skip
    return outs


def _draws(u: Tensor | None, count: int) -> Tensor | None:
    """Stochastic rounding's U[0, 1) draws as the kernels read them (None: nearest)."""
    if u is None:
        return None
    if u.dtype != torch.float32 or u.device.type != "cpu" or u.numel() != count:
        raise ValueError(f"need {count} float32 CPU draws; got {u.numel()} {u.dtype} on {u.device}")
    return u.contiguous()


def float_quantize(
    x: Tensor, scale: float, mantissa_bits: int, emin: int, maxv: float, top: float, u: Tensor | None = None
) -> Tensor:
    """FloatFormat rounding of x / scale, times scale; stochastic with one draw per element in u."""
    x = x.contiguous()
    u = _draws(u, x.numel())
    out = torch.empty_like(x)
    library().fb_float_quantize(
        _ptr(x, _f32p), x.numel(), scale, mantissa_bits, emin, maxv, top, _ptr(u, _f32p), _ptr(out, _f32p),
        _threads(),
    )  # fmt: skip
    return out


def log_stochastic(
    x: Tensor, scale: float, phase: int, shift: int, kmax: int, u_round: Tensor, u_under: Tensor | None
) -> Tensor:
    """LogFormat stochastic rounding of x / scale (radix 2**shift, magnitudes 2**phase ...
    2**(phase - shift·kmax)), times scale; stochastic underflow when u_under is given."""
    x = x.contiguous()
    u_round, u_under = _draws(u_round, x.numel()), _draws(u_under, x.numel())
    out = torch.empty_like(x)
    library().fb_log_stochastic(
        _ptr(x, _f32p), x.numel(), scale, phase, shift, kmax, _ptr(u_round, _f32p), _ptr(u_under, _f32p),
        _ptr(out, _f32p), _threads(),
    )  # fmt: skip
    return out


def _tiles(shape: torch.Size, tile: tuple[int, int]) -> int:
    (R, C), rows, cols = tile, shape[-2], shape[-1]
    return (shape.numel() // max(rows * cols, 1)) * -(-rows // R) * -(-cols // C)


def block_quantize(
    y: Tensor,
    tile: tuple[int, int],
    tensor_scale: float,
    e4m3: bool,
    codes: bool = False,
    u: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(values, element codes, scale codes) of `y` [..., rows, cols] as MXFP4 (e8m0) / NVFP4
    (e4m3), one scale per R x C tile of each matrix (1-D blocks along the rows: R = 1); the
    codes only when asked for (one per element; one per tile, matrix by matrix, row-major).
    Stochastic element rounding with draws u: R·C per tile, tile after tile, row-major inside."""
    y = y.contiguous()
    u = _draws(u, _tiles(y.shape, tile) * tile[0] * tile[1])
    out = torch.empty_like(y)
    element_codes = torch.empty(y.shape, dtype=torch.uint8) if codes else None
    scale_codes = torch.empty(_tiles(y.shape, tile), dtype=torch.uint8) if codes else None
    (R, C), rows, cols = tile, y.shape[-2], y.shape[-1]
    count = y.numel() // max(rows * cols, 1)
    library().fb_block_quantize(
        _ptr(y, _f32p), count, rows, cols, R, C, tensor_scale, int(e4m3), _ptr(u, _f32p), _ptr(out, _f32p),
        _ptr(element_codes, _u8p), _ptr(scale_codes, _u8p), _threads(),
    )  # fmt: skip
    return out, element_codes, scale_codes


def block_decode(codes: Tensor, scale_codes: Tensor, tile: tuple[int, int], tensor_scale: float, e4m3: bool):
    """Inverse of block_quantize's codes: float32 values shaped like `codes`."""
    codes, scale_codes = codes.contiguous(), scale_codes.contiguous()
    out = torch.empty(codes.shape, dtype=torch.float32)
    (R, C), rows, cols = tile, codes.shape[-2], codes.shape[-1]
    count = codes.numel() // max(rows * cols, 1)
    library().fb_block_decode(
        _ptr(codes, _u8p), _ptr(scale_codes, _u8p), count, rows, cols, R, C, tensor_scale, int(e4m3),
        _ptr(out, _f32p), _threads(),
    )  # fmt: skip
    return out


def _around(shape: torch.Size, axis: int) -> tuple[int, int, int]:
    """(outer, n, inner): a tensor of `shape` as [outer, n, inner] with `axis` in the middle."""
    return math.prod(shape[:axis]), (shape[axis] if shape else 1), math.prod(shape[axis + 1 :])


def block_quantize_axis(
    x: Tensor,
    axis: int,
    block: int,
    tensor_scale: float,
    e4m3: bool,
    codes: bool = False,
    u: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """block_quantize of 1-D blocks of `block` along `axis` (>= 0) of x, in x's own layout:
    (values, element codes, scale codes), the codes as if `axis` were moved last (one scale
    per block, draws u: `block` per block, in that order)."""
    x = x.contiguous()
    outer, n, inner = _around(x.shape, axis)
    blocks = outer * inner * -(-n // block)
    u = _draws(u, blocks * block)
    out = torch.empty_like(x)
    element_codes = torch.empty(x.shape, dtype=torch.uint8) if codes else None
    scale_codes = torch.empty(blocks, dtype=torch.uint8) if codes else None
    library().fb_block_quantize_axis(
        _ptr(x, _f32p), outer, n, inner, block, tensor_scale, int(e4m3), _ptr(u, _f32p), _ptr(out, _f32p),
        _ptr(element_codes, _u8p), _ptr(scale_codes, _u8p), _threads(),
    )  # fmt: skip
    return out, element_codes, scale_codes


def block_decode_axis(
    codes: Tensor, scale_codes: Tensor, axis: int, block: int, tensor_scale: float, e4m3: bool
):
    """Inverse of block_quantize_axis's codes: float32 values shaped like `codes`."""
    codes, scale_codes = codes.contiguous(), scale_codes.contiguous()
    outer, n, inner = _around(codes.shape, axis)
    out = torch.empty(codes.shape, dtype=torch.float32)
    library().fb_block_decode_axis(
        _ptr(codes, _u8p), _ptr(scale_codes, _u8p), outer, n, inner, block, tensor_scale, int(e4m3),
        _ptr(out, _f32p), _threads(),
    )  # fmt: skip
    return out


def philox_uniform(key: tuple[int, int], n: int) -> Tensor:
    """n float32 draws in [0, 1) from Philox4x32-10 under `key` (see base.philox_uniform)."""
    out = torch.empty(n, dtype=torch.float32)
    library().fb_philox_uniform(key[0], key[1], n, _ptr(out, _f32p), _threads())
    return out


def abs_max(x: Tensor, finite_only: bool = False) -> Tensor:
    """max |x| as a float32 scalar: NaN if x holds one, unless `finite_only`, which skips NaN
    and ±inf (0 when nothing is left)."""
    x = x.contiguous()
    return torch.tensor(library().fb_abs_max(_ptr(x, _f32p), x.numel(), int(finite_only), _threads()))


def clip_with_mask(x: Tensor, lo: float, hi: float | None) -> tuple[Tensor, Tensor]:
    """(min(max(x, lo), hi), bits: 1 where the gradient passes, eight per byte)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
    top = math.inf if hi is None else hi
    library().fb_clip_with_mask(
        _ptr(x, _f32p), x.numel(), lo, top, int(hi is not None), _ptr(y, _f32p), _ptr(bits, _u8p), _threads()
    )
    return y, bits


def masked(g: Tensor, bits: Tensor) -> Tensor:
    """g where the bit is set, else 0."""
    g = g.contiguous()
    out = torch.empty_like(g)
    library().fb_masked(_ptr(g, _f32p), g.numel(), _ptr(bits, _u8p), _ptr(out, _f32p), _threads())
    return out
