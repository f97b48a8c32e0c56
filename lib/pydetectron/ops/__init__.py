"""pydetectron's compiled ops (CPU and CUDA kernels in pydetectron._C) and their Python faces."""

from pydetectron.ops.nms import batched_nms, nms, soft_nms
from pydetectron.ops.roi_align import RoIAlign, roi_align
from pydetectron.ops.roi_pool import RoIPool, roi_pool

__all__ = ["RoIAlign", "RoIPool", "batched_nms", "nms", "roi_align", "roi_pool", "soft_nms"]
