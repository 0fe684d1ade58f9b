"""Output shapes and argument checks of the ops, shared by every fake (meta) implementation the op layer registers
(the ``sam2_fast`` custom ops' and the C++ extension's ``sam2_fast_ext`` ops'). Each takes exactly its op's
arguments, in order (each op's spec in :mod:`sam2_fast.ops.specs` names its function here); ``torch._check`` keeps
them usable with symbolic shapes."""

from __future__ import annotations

import torch


def global_attention_output(qkv: torch.Tensor, num_heads: int, q_pool: bool) -> torch.Tensor:
    """An empty (B, H', W', dim) result for a (B, H, W, 3 * dim) qkv map; H', W' halved (floor) by q_pool."""
    torch._check(qkv.dim() == 4, lambda: f"expected qkv of shape (B, H, W, 3 * dim), got {tuple(qkv.shape)}")
    torch._check(
        qkv.shape[3] % (3 * num_heads) == 0,
        lambda: f"qkv's last dim {qkv.shape[3]} is not a multiple of 3 * num_heads = {3 * num_heads}",
    )
    batch, height, width, channels3 = qkv.shape
    if q_pool:
        height, width = height // 2, width // 2
    return qkv.new_empty(batch, height, width, channels3 // 3)


def attention_backward_outputs(grad_out, qkv, qkv_bias, out, num_heads, window_size, q_pool, add_bias):
    """The (grad_qkv, grad_qkv_bias) of an attention backward: qkv's shape, and qkv_bias's ((0,) without one)."""
    torch._check(
        grad_out.shape == out.shape,
        lambda: f"attention_backward: grad_out {tuple(grad_out.shape)} and out {tuple(out.shape)} differ in shape",
    )
    grad_bias = qkv.new_empty(0) if qkv_bias is None else qkv_bias.new_empty(qkv_bias.shape)
    return qkv.new_empty(qkv.shape), grad_bias


def linear_output(input, weight, bias):
    """The (M, N) output of input (M, K) @ weight (N, K)^T + bias (N,)."""
    torch._check(
        input.dim() == 2 and weight.dim() == 2 and input.shape[1] == weight.shape[1],
        lambda: f"linear: expected input (M, K) and weight (N, K), got {tuple(input.shape)} and {tuple(weight.shape)}",
    )
    torch._check(
        bias is None or tuple(bias.shape) == (weight.shape[0],),
        lambda: f"linear: expected a bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}",
    )
    return input.new_empty(input.shape[0], weight.shape[0])


def linear_weight_grad_outputs(grad, input, with_bias):
    """The (grad_weight (N, K), grad_bias (N,) or (0,)) of a linear layer from grad (M, N) and input (M, K)."""
    torch._check(
        grad.dim() == 2 and input.dim() == 2 and grad.shape[0] == input.shape[0],
        lambda: f"linear_weight_grad: expected grad (M, N) and input (M, K), got {tuple(grad.shape)} and "
        f"{tuple(input.shape)}",
    )
    return grad.new_empty(grad.shape[1], input.shape[1]), grad.new_empty(grad.shape[1] if with_bias else 0)


def queries_per_window(window_size: int, q_pool: bool) -> int:
    """The query tokens of one window: all of its window_size**2 tokens, or a quarter with 2x2 q-pooling."""
    return (window_size // 2) ** 2 if q_pool else window_size**2


def window_attention_output(
    qkv: torch.Tensor, qkv_bias, num_heads: int, window_size: int, q_pool: bool, add_bias: bool = False
) -> torch.Tensor:
    """As :func:`global_attention_output`, for windows of ``window_size`` (even with q_pool)."""
    torch._check(window_size > 0, lambda: f"window_size must be positive, got {window_size}")
    torch._check(not q_pool or window_size % 2 == 0, lambda: f"q_pool needs an even window_size, got {window_size}")
    return global_attention_output(qkv, num_heads, q_pool)


def maxpool2x2_output(x: torch.Tensor) -> torch.Tensor:
    torch._check(x.dim() == 4, lambda: f"expected a (B, H, W, C) map, got shape {tuple(x.shape)}")
    return x.new_empty(x.shape[0], x.shape[1] // 2, x.shape[2] // 2, x.shape[3])


def maxpool2x2_backward_output(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x's gradient: x's shape and dtype."""
    return x.new_empty(x.shape)


def fpn_upsample_add_output(lateral: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    torch._check(
        lateral.dim() == 4 and prev.dim() == 4 and lateral.shape[:2] == prev.shape[:2]
        and lateral.shape[2] == 2 * prev.shape[2] and lateral.shape[3] == 2 * prev.shape[3],
        lambda: f"expected lateral (B, C, 2h, 2w) and prev (B, C, h, w), got {tuple(lateral.shape)} and "
        f"{tuple(prev.shape)}",
    )
    return lateral.new_empty(lateral.shape, dtype=torch.promote_types(lateral.dtype, torch.float32))


def fpn_upsample_add_backward_output(grad: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """prev's gradient (the 2x2 sums of ``grad``): prev's shape and dtype."""
    torch._check(
        grad.dim() == 4 and prev.dim() == 4 and grad.shape[2] == 2 * prev.shape[2]
        and grad.shape[3] == 2 * prev.shape[3],
        lambda: f"expected grad (B, C, 2h, 2w) and prev (B, C, h, w), got {tuple(grad.shape)} and {tuple(prev.shape)}",
    )
    return prev.new_empty(prev.shape)


def check_bias_gelu(x: torch.Tensor, bias) -> None:
    """The arguments of bias_gelu_ (in place, so its fakes return nothing new): x (..., C) and bias (C,) or None."""
    torch._check(x.dim() >= 1, lambda: "bias_gelu_: expected a tensor of shape (..., C), got a scalar")
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == x.shape[-1],
            lambda: f"bias_gelu_: expected a bias of shape ({x.shape[-1]},) for x of shape {tuple(x.shape)}, "
            f"got {tuple(bias.shape)}",
        )


def sine_position_encoding_output(
    height: int, width: int, num_pos_feats: int, temperature: float, normalize: bool, scale: float,
    device: torch.device,
) -> torch.Tensor:
    """The (1, 2 * num_pos_feats, height, width) fp32 encoding."""
    return torch.empty(1, 2 * num_pos_feats, height, width, dtype=torch.float32, device=device)
