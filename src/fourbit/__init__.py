"""fourbit: train neural networks with 4-bit numbers (Sun et al., NeurIPS 2020) in PyTorch."""

__version__ = "0.1.0"
