"""pydetectron: Facebook's Detectron reimplemented in PyTorch, with its own C++/CUDA ops."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `pydetectron.Predictor` without importing the whole library with the package (pydetectron.ops stays light)
    if name == "Predictor":
        from pydetectron.engine.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'pydetectron' has no attribute {name!r}")
