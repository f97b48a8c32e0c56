"""pydetectron: Facebook's Detectron reimplemented in PyTorch, with its own C++/CUDA ops."""

__version__ = "0.1.0"
