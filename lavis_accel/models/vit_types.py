"""More ``vit_type`` values for BLIP's vision encoder: ``tiny`` (tests, demo) and ``small`` (ViT-S/16).

LAVIS 1.0.2's ``VisionTransformerEncoder.from_config`` accepts only ``vit_type: base`` or ``large``. This module wraps
it so that a type registered here builds the same ``lavis.models.vit.VisionTransformer`` at the registered size,
reading the other ``vit_*`` keys exactly as LAVIS does. ``base`` and ``large`` still go to LAVIS's own code, unchanged.

With a plugin type, these optional keys override its size: ``vit_width``, ``vit_depth``, ``vit_num_heads``,
``vit_patch_size``. Plugin types have no pretrained ViT weights of their own; their weights come from the model's
checkpoint (``pretrained``/``finetuned``), as usual.
"""
from functools import partial

import torch.nn as nn
from lavis.models.vit import VisionTransformerEncoder

STOCK_VIT_TYPES = ("base", "large")
SIZE_KEYS = {"vit_width": "width", "vit_depth": "depth", "vit_num_heads": "num_heads", "vit_patch_size": "patch_size"}

_VIT_TYPES = {}


def register_vit_type(name, *, width, depth, num_heads, patch_size=16):
    """Make ``vit_type: <name>`` build a ViT of this size. Registering the same size again is a no-op."""
    if name in STOCK_VIT_TYPES:
        raise ValueError(f"vit_type '{name}' is LAVIS's own and cannot be redefined")
    if width % num_heads:
        raise ValueError(f"vit_type '{name}': width {width} is not divisible by num_heads {num_heads}")
    size = {"width": width, "depth": depth, "num_heads": num_heads, "patch_size": patch_size}
    if _VIT_TYPES.get(name, size) != size:
        raise ValueError(f"vit_type '{name}' is already registered with a different size {_VIT_TYPES[name]}")
    _VIT_TYPES[name] = size


def vit_type_size(name):
    """The size (width, depth, num_heads, patch_size) registered for a plugin ``vit_type``."""
    if name not in _VIT_TYPES:
        raise ValueError(f"vit_type: unknown '{name}'; known: {list(STOCK_VIT_TYPES) + sorted(_VIT_TYPES)}")
    return dict(_VIT_TYPES[name])


def _encoder_size(cfg, vit_type):
    size = vit_type_size(vit_type)
    for key, field in SIZE_KEYS.items():
        if cfg.get(key) is not None:
            size[field] = int(cfg.get(key))
    if size["width"] % size["num_heads"]:
        raise ValueError(f"vit_width {size['width']} is not divisible by vit_num_heads {size['num_heads']}")
    return size


def _build_plugin_encoder(cls, cfg, vit_type, from_pretrained):
    if from_pretrained:
        raise ValueError(f"vit_type '{vit_type}' has no pretrained ViT weights; load them with the model checkpoint")
    size = _encoder_size(cfg, vit_type)
    norm_layer_eps = cfg.get("vit_layer_norm_epsilon", -1)
    encoder = cls(
        img_size=cfg.get("image_size", 384),
        patch_size=size["patch_size"],
        embed_dim=size["width"],
        depth=size["depth"],
        num_heads=size["num_heads"],
        use_grad_checkpointing=cfg.get("vit_grad_ckpt", False),
        ckpt_layer=cfg.get("vit_ckpt_layer", 0),
        drop_path_rate=cfg.get("vit_drop_path_rate", 0),
        norm_layer=None if norm_layer_eps == -1 else partial(nn.LayerNorm, eps=norm_layer_eps),
    )
    encoder.vision_width = size["width"]
    return encoder


def enable_plugin_vit_types():
    """Wrap ``VisionTransformerEncoder.from_config`` once; stock types are passed to LAVIS's code untouched."""
    if getattr(VisionTransformerEncoder, "_lavis_accel_vit_types", False):
        return
    stock_from_config = VisionTransformerEncoder.from_config.__func__

    def from_config(cls, cfg, from_pretrained=False):
        vit_type = cfg.get("vit_type", "base")
        if vit_type in STOCK_VIT_TYPES:
            given = [key for key in SIZE_KEYS if cfg.get(key) is not None]
            if given:
                raise ValueError(f"{given[0]} needs a plugin vit_type (e.g. 'tiny'); '{vit_type}' has a fixed size")
            return stock_from_config(cls, cfg, from_pretrained)
        return _build_plugin_encoder(cls, cfg, vit_type, from_pretrained)

    from_config.__doc__ = stock_from_config.__doc__
    VisionTransformerEncoder.from_config = classmethod(from_config)
    VisionTransformerEncoder._lavis_accel_vit_types = True


register_vit_type("tiny", width=128, depth=4, num_heads=4, patch_size=16)
register_vit_type("small", width=384, depth=12, num_heads=6, patch_size=16)  # ViT-S/16 (DeiT-S)
enable_plugin_vit_types()
