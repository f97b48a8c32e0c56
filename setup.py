"""Build pydetectron and its C++/CUDA extension ``pydetectron._C``.

CUDA kernels are compiled when a CUDA toolkit is found and either a GPU is visible or ``FORCE_CUDA=1``;
``TORCH_CUDA_ARCH_LIST`` picks the architectures (torch's own rule).
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    has_toolkit = CUDA_HOME is not None
    return has_toolkit and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1")


def _extension():
    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # -fopenmp: at::parallel_for only spreads work over threads when the caller is built with OpenMP.
    extra = {"cxx": ["-O3", "-fopenmp"]}
    macros = []
    extension = CppExtension
    if _want_cuda():
        extension = CUDAExtension
        sources += rel("csrc/cuda/*.cu")
        macros.append(("WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    return extension(
        "pydetectron._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


setup(
    name="pydetectron",
    version="0.1.0",
    description="Detectron (Caffe2) reimplemented in PyTorch, with its own C++/CUDA ops",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    python_requires=">=3.9",
    install_requires=[
        "torch",
        "torchvision",
        "opencv-python-headless",
        "pycocotools",
        "tensorboardX",
        "scipy",
        "pyyaml",
    ],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
