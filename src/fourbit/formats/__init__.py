"""Number formats: pure functions from float tensors to a grid (no nn, no state).

    >>> from fourbit import formats
    >>> formats.get("fp4_radix4").values()
    tensor([-1.0000, -0.2500, ..., 0.2500, 1.0000])

Every format has `quantize`, `encode`, `decode` and `values`; see `base.Format`.
fp32 is not a format here: it is the identity (no quantization).
"""

from fourbit.formats.base import Format
from fourbit.formats.block import FP4_E2M1, FP8_E4M3, BlockCodes, BlockFormat
from fourbit.formats.floating import FloatFormat
from fourbit.formats.integer import IntFormat, pixels_to_int4
from fourbit.formats.log import LogFormat

_REGISTRY: dict[str, Format] = {
    f.name: f
    for f in (
        IntFormat(4, name="int4"),
        IntFormat(4, signed=False, name="uint4"),
        IntFormat(8, name="int8"),
        LogFormat(4, 3, name="fp4_radix4"),
        LogFormat(2, 3, name="fp4_radix2"),
        LogFormat(8, 3, name="fp4_radix8"),
        FloatFormat(5, 10, name="fp16"),
        FloatFormat(8, 7, name="bf16"),
        FP8_E4M3,
        FloatFormat(5, 2, name="fp8_e5m2"),
        # HFP8 (Sun et al. 2019): 1-4-3 forward, 1-5-2 backward. (choice) default bias and
        # every code finite; `bias` is a parameter for a shifted range.
        FloatFormat(4, 3, specials="finite", name="hfp8_fwd"),
        FloatFormat(5, 2, specials="finite", name="hfp8_bwd"),
        FP4_E2M1,
        BlockFormat((32,), "e8m0", name="mxfp4"),
        BlockFormat((16,), "e4m3", name="nvfp4"),
        BlockFormat((16, 16), "e4m3", name="nvfp4_2d"),  # NVFP4 weights: one scale per 16x16 tile
    )
}


def names() -> list[str]:
    """Names accepted by `get`."""
    return list(_REGISTRY)


def get(name: str) -> Format:
    """The named format (see `names()`)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


__all__ = [
    "BlockCodes",
    "BlockFormat",
    "FloatFormat",
    "Format",
    "IntFormat",
    "LogFormat",
    "get",
    "names",
    "pixels_to_int4",
]
