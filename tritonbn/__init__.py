"""tritonbn: batch normalization for PyTorch on Triton kernels.

Layers: kernels (``tritonbn.kernels``, ``_bn_*_kernel``) → launchers and autograd (``tritonbn.ops``) →
``batch_norm`` (``tritonbn.functional``) → ``BatchNorm1d/2d/3d`` and ``BatchNormAct1d/2d/3d``
(``tritonbn.modules``) → ``fuse_model`` (``tritonbn.fuse``), which puts them into a stock model. Where a
call runs is decided in ``tritonbn.dispatch``.
"""

from tritonbn.dispatch import uses_triton
from tritonbn.functional import batch_norm
from tritonbn.fuse import FuseReport, fuse_model
from tritonbn.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    convert_model,
    revert_model,
)
from tritonbn.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "FuseReport", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d", "SyncBatchNorm",
           "batch_norm", "convert_model", "convert_sync_batchnorm", "fuse_model", "revert_model",
           "uses_triton"]
__version__ = "0.1.0"
