"""fourbit: train neural networks with 4-bit numbers (Sun et al., NeurIPS 2020) in PyTorch.

model = fourbit.convert(model, "ibm4", example_input=x)   # then train as usual
"""

from fourbit.convert import convert, summary

__version__ = "0.1.0"
__all__ = ["convert", "summary"]
