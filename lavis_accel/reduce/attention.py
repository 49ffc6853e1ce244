"""Multi-head attention through ``scaled_dot_product_attention``, with an additive bias and the [CLS] row.

Proportional attention is an additive float mask (``log size`` per key), so the fused SDPA kernels still apply.
Turbo needs the [CLS] query's attention probabilities: they are computed from that one query
(``q_cls @ K^T``) with the same bias, never from the full ``T x T`` matrix.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def cls_attention_row(
    q: torch.Tensor, k: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Head-averaged attention probabilities ``[B, T]`` of query 0 ([CLS]) over all keys (before any dropout).

    ``q``, ``k`` are ``[B, H, T, D]``; ``bias`` broadcasts to ``[B, H, 1, T]``.
    """
    return attention_probs(q[:, :, :1], k, scale, bias).mean(dim=1)[:, 0]


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias)`` over the keys, ``[B, H, Tq, Tk]``."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    need_cls_row: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``softmax(q k^T * scale + bias) v`` for ``[B, H, T, D]`` inputs; also the [CLS] row when asked.

    Returns ``(out [B, H, T, D], cls_row [B, T] or None)``.
    """
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    cls_row = cls_attention_row(q, k, scale, bias) if need_cls_row else None
    return out, cls_row


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention with the full probability matrix, for methods that score tokens by it (MADTP).

    Returns ``(out [B, H, T, D], probs [B, H, T, T] before dropout, cls_probs [B, H, T])``: ``cls_probs`` is the
    [CLS] query's row after dropout, the one that weighted the values (as in the reference code).
    """
    probs = attention_probs(q, k, scale, None if bias is None else bias.to(q.dtype))
    dropped = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
    return dropped @ v, probs, dropped[:, :, 0]


def reference_order_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention in the op order of torch's (and CrossGET's mocked) eager multi-head attention: ``q / sqrt(d)``,
    batched product over ``B * H``, ``+ bias``, softmax, dropout, product with ``v``. ``[B, H, T, D]`` in and out.

    The result equals that code's bit for bit, where SDPA's differs in the last bits. A method whose discrete
    decisions can hinge on such bits (CrossGET's ranking of near-equal similarities) uses it to decide as the
    reference does.
    """
    batch, heads, tokens, width = q.shape
    flat = batch * heads
    logits = torch.bmm(q.reshape(flat, tokens, width) / math.sqrt(width),
                       k.reshape(flat, -1, width).transpose(-2, -1))
    if bias is not None:
        logits = logits + bias.to(q.dtype).expand(batch, heads, tokens, -1).reshape(flat, tokens, -1)
    probs = logits.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.bmm(probs, v.reshape(flat, -1, width)).reshape(batch, heads, tokens, width)
