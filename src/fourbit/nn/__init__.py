"""Quantized layers: drop-in replacements whose three GEMMs follow a LayerSpec."""

from fourbit.nn.layers import QConv1d, QConv2d, QLinear, QMatmul, QuantState
from fourbit.nn.spec import FP32, FP32_LAYER, LayerSpec, OperandSpec

__all__ = [
    "FP32",
    "FP32_LAYER",
    "LayerSpec",
    "OperandSpec",
    "QConv1d",
    "QConv2d",
    "QLinear",
    "QMatmul",
    "QuantState",
]
