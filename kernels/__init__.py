"""Triton kernels of sam2_fast, installed as ``sam2_fast.kernels``: one module per fused op, each holding its
``@triton.jit`` kernel(s) and a launcher that checks its inputs and picks the grid.

Only the op layer (``sam2_fast.ops``) imports this package. ``KERNEL_LAUNCHERS`` maps an op name to its launcher,
which takes the same arguments as the op's torch implementation in ``sam2_fast.backends.torch_ops``; ``BACKWARD_LAUNCHERS``
maps it to the launcher of its backward (attention: one for window and global attention, window_size 0 global).
"""

from .attention_backward import attention_backward
from .fpn_upsample_add import fpn_upsample_add
from .fpn_upsample_add_backward import fpn_upsample_add_backward
from .global_attention import global_attention
from .maxpool2x2 import maxpool2x2
from .maxpool2x2_backward import maxpool2x2_backward
from .window_attention import window_attention

KERNEL_LAUNCHERS = {
    "window_attention": window_attention,
    "global_attention": global_attention,
    "maxpool2x2": maxpool2x2,
    "fpn_upsample_add": fpn_upsample_add,
}

BACKWARD_LAUNCHERS = {
    "window_attention": attention_backward,
    "global_attention": attention_backward,
    "maxpool2x2": maxpool2x2_backward,
    "fpn_upsample_add": fpn_upsample_add_backward,
}
