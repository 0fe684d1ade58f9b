"""The argument checks of every Triton launcher, forward and backward (``kernels.launch.checked_operand``): an
argument of the wrong shape, dtype or device, or one that is no tensor, raises before any launch with an error that
names the op, the argument, what was expected and what came.

No kernel runs, so these need neither a GPU nor the interpreter: the launchers get fake CUDA tensors (shapes,
dtypes and devices without storage) and meta tensors for a device they cannot run on. The module skips where
triton is not installed.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("triton", reason="triton is not installed: there are no Triton launchers to check")

from sam2_fast.kernels.attention_backward import attention_backward  # noqa: E402
from sam2_fast.kernels.fpn_upsample_add import fpn_upsample_add  # noqa: E402
from sam2_fast.kernels.fpn_upsample_add_backward import fpn_upsample_add_backward  # noqa: E402
from sam2_fast.kernels.global_attention import global_attention  # noqa: E402
from sam2_fast.kernels.launch import checked_operand  # noqa: E402
from sam2_fast.kernels.maxpool2x2 import maxpool2x2  # noqa: E402
from sam2_fast.kernels.maxpool2x2_backward import maxpool2x2_backward  # noqa: E402
from sam2_fast.kernels.window_attention import window_attention  # noqa: E402

FLOATS = "float32, bfloat16 or float16"


@pytest.fixture
def fake_cuda():
    """Tensors made in the test are fake: a CUDA device without a GPU (every check fires before a launch)."""
    with FakeTensorMode():
        yield


def _map(*shape, dtype=torch.float32, device="cuda"):
    return torch.empty(shape, dtype=dtype, device=device)


# (label, call, error type, message pattern)
REJECTED = [
    ("window_attention qkv rank", lambda: window_attention(_map(4, 4, 36), None, 2, 4, False), ValueError,
     r"window_attention: expected qkv of shape \(B, H, W, 3 \* dim\), got \(4, 4, 36\)"),
    ("window_attention qkv dtype", lambda: window_attention(_map(1, 4, 4, 36, dtype=torch.float64), None, 2, 4, False),
     TypeError, rf"window_attention: expected qkv of dtype {FLOATS}, got torch.float64"),
    ("window_attention qkv integer", lambda: window_attention(_map(1, 4, 4, 36, dtype=torch.int32), None, 2, 4, False),
     TypeError, rf"window_attention: expected qkv of dtype {FLOATS}, got torch.int32"),
    ("window_attention qkv not a tensor", lambda: window_attention([[0.0] * 36], None, 2, 4, False), TypeError,
     "window_attention: expected qkv to be a tensor, got list"),
    ("window_attention heads", lambda: window_attention(_map(1, 4, 4, 36), None, 5, 4, False), ValueError,
     r"window_attention: expected qkv's last dim to be a multiple of 3 \* num_heads = 15, got 36"),
    ("window_attention bias shape", lambda: window_attention(_map(1, 4, 4, 36), _map(12), 2, 4, False), ValueError,
     r"window_attention: expected qkv_bias of shape \(36,\), got \(12,\)"),
    ("window_attention bias dtype",
     lambda: window_attention(_map(1, 4, 4, 36), _map(36, dtype=torch.float64), 2, 4, False), TypeError,
     rf"window_attention: expected qkv_bias of dtype {FLOATS}, got torch.float64"),
    ("window_attention odd pooled window", lambda: window_attention(_map(1, 4, 4, 36), None, 2, 7, True), ValueError,
     r"window_attention: expected a window_size >= 1 \(even with q_pool\), got 7"),
    ("window_attention qkv device", lambda: window_attention(_map(1, 4, 4, 36, device="meta"), None, 2, 4, False),
     ValueError, r"window_attention: expected qkv on a CUDA device \(or on CPU under TRITON_INTERPRET=1\), got a meta"),
    ("global_attention qkv rank", lambda: global_attention(_map(1, 4, 4, 4, 36), 2, False), ValueError,
     r"global_attention: expected qkv of shape \(B, H, W, 3 \* dim\), got \(1, 4, 4, 4, 36\)"),
    ("global_attention qkv dtype", lambda: global_attention(_map(1, 4, 4, 36, dtype=torch.float64), 2, False),
     TypeError, rf"global_attention: expected qkv of dtype {FLOATS}, got torch.float64"),
    ("global_attention heads", lambda: global_attention(_map(1, 4, 4, 40), 2, False), ValueError,
     r"global_attention: expected qkv's last dim to be a multiple of 3 \* num_heads = 6, got 40"),
    ("global_attention qkv device", lambda: global_attention(_map(1, 4, 4, 36, device="meta"), 2, False), ValueError,
     "global_attention: expected qkv on a CUDA device"),
    ("attention_backward grad_out shape",
     lambda: attention_backward(_map(1, 4, 4, 12), _map(1, 4, 4, 36), None, _map(1, 2, 2, 12), 2, 4, True),
     ValueError, r"attention_backward: expected grad_out of shape \(1, 2, 2, 12\), got \(1, 4, 4, 12\)"),
    ("attention_backward out shape",
     lambda: attention_backward(_map(1, 4, 4, 12), _map(1, 4, 4, 36), None, _map(1, 4, 12), 2, 0, False),
     ValueError, r"attention_backward: expected out of shape \(1, 4, 4, 12\), got \(1, 4, 12\)"),
    ("attention_backward grad_out dtype",
     lambda: attention_backward(_map(1, 4, 4, 12), _map(1, 4, 4, 36, dtype=torch.bfloat16), None,
                                _map(1, 4, 4, 12, dtype=torch.bfloat16), 2, 4, False),
     TypeError, r"attention_backward: expected grad_out of dtype bfloat16, got torch.float32"),
    ("attention_backward bias shape",
     lambda: attention_backward(_map(1, 4, 4, 12), _map(1, 4, 4, 36), _map(3, 12), _map(1, 4, 4, 12), 2, 4, False),
     ValueError, r"attention_backward: expected qkv_bias of shape \(36,\), got \(3, 12\)"),
    ("attention_backward window", lambda: attention_backward(_map(1, 4, 4, 12), _map(1, 4, 4, 36), None,
                                                             _map(1, 4, 4, 12), 2, -1, False),
     ValueError, r"attention_backward: expected window_size 0 \(global\) or >= 1 \(even with q_pool\), got -1"),
    ("maxpool2x2 x rank", lambda: maxpool2x2(_map(4, 4, 3)), ValueError,
     r"maxpool2x2: expected x of shape \(B, H, W, C\), got \(4, 4, 3\)"),
    ("maxpool2x2 x dtype", lambda: maxpool2x2(_map(1, 4, 4, 3, dtype=torch.float64)), TypeError,
     rf"maxpool2x2: expected x of dtype {FLOATS}, got torch.float64"),
    ("maxpool2x2 x device", lambda: maxpool2x2(_map(1, 4, 4, 3, device="meta")), ValueError,
     r"maxpool2x2: expected x on a CUDA device \(or on CPU under TRITON_INTERPRET=1\), got a meta tensor"),
    ("maxpool2x2_backward grad_out shape", lambda: maxpool2x2_backward(_map(1, 2, 3, 3), _map(1, 5, 5, 3)),
     ValueError, r"maxpool2x2_backward: expected grad_out of shape \(1, 2, 2, 3\), got \(1, 2, 3, 3\)"),
    ("maxpool2x2_backward grad_out dtype",
     lambda: maxpool2x2_backward(_map(1, 2, 2, 3, dtype=torch.float16), _map(1, 5, 5, 3)), TypeError,
     r"maxpool2x2_backward: expected grad_out of dtype float32, got torch.float16"),
    ("maxpool2x2_backward x rank", lambda: maxpool2x2_backward(_map(1, 2, 2, 3), _map(5, 5, 3)), ValueError,
     r"maxpool2x2_backward: expected x of shape \(B, H, W, C\), got \(5, 5, 3\)"),
    ("fpn_upsample_add lateral shape", lambda: fpn_upsample_add(_map(1, 4, 6, 9), _map(1, 4, 3, 5)), ValueError,
     r"fpn_upsample_add: expected lateral of shape \(1, 4, 6, 10\), got \(1, 4, 6, 9\)"),
    ("fpn_upsample_add prev rank", lambda: fpn_upsample_add(_map(1, 4, 6, 10), _map(4, 3, 5)), ValueError,
     r"fpn_upsample_add: expected prev of shape \(B, C, h, w\), got \(4, 3, 5\)"),
    ("fpn_upsample_add prev dtype",
     lambda: fpn_upsample_add(_map(1, 4, 6, 10), _map(1, 4, 3, 5, dtype=torch.float64)), TypeError,
     rf"fpn_upsample_add: expected prev of dtype {FLOATS}, got torch.float64"),
    ("fpn_upsample_add lateral dtype",
     lambda: fpn_upsample_add(_map(1, 4, 6, 10, dtype=torch.int64), _map(1, 4, 3, 5)), TypeError,
     rf"fpn_upsample_add: expected lateral of dtype {FLOATS}, got torch.int64"),
    ("fpn_upsample_add_backward grad dtype",
     lambda: fpn_upsample_add_backward(_map(1, 4, 6, 10, dtype=torch.bfloat16), _map(1, 4, 3, 5)), TypeError,
     r"fpn_upsample_add_backward: expected grad of dtype float32, got torch.bfloat16"),
    ("fpn_upsample_add_backward grad shape", lambda: fpn_upsample_add_backward(_map(1, 4, 6, 8), _map(1, 4, 3, 5)),
     ValueError, r"fpn_upsample_add_backward: expected grad of shape \(1, 4, 6, 10\), got \(1, 4, 6, 8\)"),
    ("fpn_upsample_add_backward prev rank", lambda: fpn_upsample_add_backward(_map(1, 4, 6, 10), _map(1, 4, 3)),
     ValueError, r"fpn_upsample_add_backward: expected prev of shape \(B, C, h, w\), got \(1, 4, 3\)"),
]


@pytest.mark.usefixtures("fake_cuda")
@pytest.mark.parametrize("call, error, message", [case[1:] for case in REJECTED], ids=[case[0] for case in REJECTED])
def test_launcher_rejects(call, error, message):
    with pytest.raises(error, match=message):
        call()


# Operands on another device than the first one: (label, call, message).
MISPLACED = [
    ("window_attention qkv_bias", lambda: window_attention(_map(1, 4, 4, 36), _map(36, device="meta"), 2, 4, False),
     "window_attention: expected qkv_bias on"),
    ("attention_backward grad_out",
     lambda: attention_backward(_map(1, 4, 4, 12, device="meta"), _map(1, 4, 4, 36), None, _map(1, 4, 4, 12), 2, 4,
                                False),
     "attention_backward: expected grad_out on"),
    ("maxpool2x2_backward grad_out", lambda: maxpool2x2_backward(_map(1, 2, 2, 3, device="meta"), _map(1, 5, 5, 3)),
     "maxpool2x2_backward: expected grad_out on"),
    ("fpn_upsample_add lateral", lambda: fpn_upsample_add(_map(1, 4, 6, 10, device="meta"), _map(1, 4, 3, 5)),
     "fpn_upsample_add: expected lateral on"),
    ("fpn_upsample_add_backward grad",
     lambda: fpn_upsample_add_backward(_map(1, 4, 6, 10, device="meta"), _map(1, 4, 3, 5)),
     "fpn_upsample_add_backward: expected grad on"),
]


@pytest.mark.usefixtures("fake_cuda")
@pytest.mark.parametrize("call, message", [case[1:] for case in MISPLACED], ids=[case[0] for case in MISPLACED])
def test_launcher_rejects_operands_on_another_device(call, message):
    with pytest.raises(ValueError, match=rf"{message} cuda(:0)? \(where the other operands are\), got meta"):
        call()


def test_checked_operand_layouts():
    """What each layout returns: the tensor itself where the kernel reads it as it lies, else a contiguous copy."""
    cpu = torch.device("cpu")  # given explicitly, the device is compared rather than required to run kernels

    def checked(tensor, layout):
        return checked_operand("op", "x", tensor, ("B", "H", "W", "C"), (torch.float32,), layout, cpu)

    generator = torch.Generator().manual_seed(0)

    def values(*shape):  # the copies are compared with torch.equal: no uninitialised memory (it may hold NaN)
        return torch.randn(shape, generator=generator)

    dense = values(2, 3, 4, 5)
    transposed = dense.transpose(1, 2)
    channels_first = values(2, 5, 3, 4).permute(0, 2, 3, 1)
    broadcast = values(1, 3, 1, 5).expand(2, 3, 4, 5)
    for tensor in (dense, transposed, channels_first, broadcast):
        assert checked(tensor, "strided") is tensor
    for tensor in (dense, transposed, broadcast):
        assert checked(tensor, "rows") is tensor
    rows = checked(channels_first, "rows")
    assert rows.is_contiguous() and torch.equal(rows, channels_first)
    assert checked(dense, "contiguous") is dense
    for tensor in (transposed, channels_first, broadcast):
        normalised = checked(tensor, "contiguous")
        assert normalised.is_contiguous() and torch.equal(normalised, tensor)
    with pytest.raises(ValueError, match="op: expected layout 'strided', 'rows' or 'contiguous' for x, got 'packed'"):
        checked(dense, "packed")
    with pytest.raises(ValueError, match=r"op: expected x of shape \(B, H, W, 5\), got \(2, 3, 4, 6\)"):
        checked_operand("op", "x", _map(2, 3, 4, 6, device="cpu"), ("B", "H", "W", 5), (torch.float32,), "rows", cpu)
    with pytest.raises(ValueError, match=r"op: expected x on cpu \(where the other operands are\), got meta"):
        checked(_map(2, 3, 4, 5, device="meta"), "rows")
