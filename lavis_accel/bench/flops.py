"""FLOP counting: torch's counter made to see CPU attention, and the analytic count of a ViT for a token schedule.

FLOPs follow torch's convention: a multiply-add is 2 FLOPs; only matrix products and convolutions are counted
(norms, activations, softmax and the merge arithmetic are not).
"""
import math
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

# The fused attention op that SDPA dispatches to on CPU. torch registers formulas for the CUDA ops
# (flash, efficient, cudnn) but not for this one, so without a formula attention counts as 0 FLOPs.
_CPU_FLASH_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def attention_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    """FLOPs of softmax(Q K^T) V: two batched products, [L, E] x [E, S] and [L, S] x [S, Ev], per batch and head."""
    *leading, queries, width = query_shape
    keys = key_shape[-2]
    value_width = value_shape[-1]
    batch_heads = math.prod(leading)
    return 2 * batch_heads * queries * keys * (width + value_width)


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query_shape, key_shape, value_shape)


def ensure_cpu_attention_formula() -> None:
    """Register the FLOP formula of CPU fused attention once (forward only: the bench measures inference).

    The CUDA ops already have formulas in torch; they are left alone, so nothing is counted twice.
    """
    if _CPU_FLASH_ATTENTION not in flop_registry:
        register_flop_formula(_CPU_FLASH_ATTENTION)(_cpu_flash_attention_flops)


def count_flops(fn: Callable[[], object]) -> int:
    """Run ``fn()`` under torch's FLOP counter and return the FLOPs it executed (attention included)."""
    ensure_cpu_attention_formula()
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def vit_flops(
    token_schedule: Sequence[int],
    embed_dim: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    patch_size: int = 16,
    in_chans: int = 3,
    cls_attention_row: bool = False,
) -> int:
    """Analytic FLOPs of one image through a ViT whose tokens follow ``token_schedule``.

    ``token_schedule[l]`` is the number of tokens entering block ``l`` and ``token_schedule[l + 1]`` the number
    leaving it (so it has depth + 1 entries and starts with patches + [CLS]). A merging block runs attention on
    its input tokens, merges between attention and MLP, and runs the MLP on its output tokens. Merging costs one
    similarity product between the two halves of the tokens on the head-averaged keys (width embed_dim / heads).
    ``cls_attention_row``: every merging block also computes the [CLS] query's attention row (Turbo's semantic
    term); blocks that merge nothing skip it.
    """
    width = embed_dim
    hidden = int(width * mlp_ratio)
    head_width = width // num_heads
    num_patches = token_schedule[0] - 1
    total = 2 * num_patches * width * in_chans * patch_size * patch_size  # patch embedding convolution
    for tokens_in, tokens_out in zip(token_schedule[:-1], token_schedule[1:]):
        total += 2 * tokens_in * width * 3 * width  # qkv projection
        total += 2 * tokens_in * tokens_in * 2 * width  # Q K^T and attention x V
        total += 2 * tokens_in * width * width  # output projection
        if tokens_out < tokens_in:
            if cls_attention_row:
                total += 2 * tokens_in * width  # q_cls K^T over all heads
            set_a, set_b = (tokens_in + 1) // 2, tokens_in // 2  # even / odd token indices
            total += 2 * set_a * set_b * head_width
        total += 2 * tokens_out * width * hidden * 2  # MLP fc1 and fc2
    return total


def lavis_vit_flops(vit, token_schedule: Sequence[int], cls_attention_row: bool = False) -> int:
    """``vit_flops`` with the geometry read from a LAVIS ``VisionTransformer`` (``lavis.models.vit``)."""
    first_block = vit.blocks[0]
    return vit_flops(
        token_schedule,
        embed_dim=vit.embed_dim,
        num_heads=first_block.attn.num_heads,
        mlp_ratio=first_block.mlp.fc1.out_features / vit.embed_dim,
        patch_size=vit.patch_embed.proj.kernel_size[0],
        in_chans=vit.patch_embed.proj.in_channels,
        cls_attention_row=cls_attention_row,
    )
