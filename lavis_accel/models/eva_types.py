"""More ``vit_model`` values for BLIP-2's vision encoder: ``eva_vit_tiny`` for tests and the demo.

LAVIS 1.0.2's ``Blip2Base.init_vision_encoder`` accepts only ``eva_clip_g`` and ``clip_L``, both 1 GB downloads. This
module wraps it so that a name registered here builds a ``lavis.models.eva_vit.VisionTransformer`` of the registered
size (randomly initialised, no relative position bias), handled like LAVIS's EVA-g: the same layer-norm epsilon,
gradient checkpointing, fp16 conversion when ``vit_precision`` is ``fp16``, and BLIP-2's ``ln_vision`` after it.
``eva_clip_g`` and ``clip_L`` still go to LAVIS's own code, unchanged.
"""
from functools import partial

import torch.nn as nn
from lavis.models import eva_vit
from lavis.models.blip2_models import blip2

STOCK_VIT_MODELS = ("eva_clip_g", "clip_L")

_VIT_MODELS = {}


def register_eva_vit(name, *, width, depth, num_heads, patch_size=16, mlp_ratio=4.0):
    """Make ``vit_model: <name>`` build an EVA ViT of this size. Registering the same size again is a no-op."""
    if name in STOCK_VIT_MODELS:
        raise ValueError(f"vit_model '{name}' is LAVIS's own and cannot be redefined")
    if width % num_heads:
        raise ValueError(f"vit_model '{name}': width {width} is not divisible by num_heads {num_heads}")
    size = {"width": width, "depth": depth, "num_heads": num_heads, "patch_size": patch_size, "mlp_ratio": mlp_ratio}
    if _VIT_MODELS.get(name, size) != size:
        raise ValueError(f"vit_model '{name}' is already registered with a different size {_VIT_MODELS[name]}")
    _VIT_MODELS[name] = size


def build_eva_vit(name, img_size, drop_path_rate, use_grad_checkpoint, precision):
    """A randomly initialised EVA ViT of the size registered under ``name``, as ``create_eva_vit_g`` builds EVA-g."""
    size = _VIT_MODELS[name]
    model = eva_vit.VisionTransformer(
        img_size=img_size,
        patch_size=size["patch_size"],
        use_mean_pooling=False,
        embed_dim=size["width"],
        depth=size["depth"],
        num_heads=size["num_heads"],
        mlp_ratio=size["mlp_ratio"],
        qkv_bias=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_checkpoint=use_grad_checkpoint,
    )
    if precision == "fp16":
        eva_vit.convert_weights_to_fp16(model)
    return model


def enable_plugin_vit_models():
    """Wrap ``Blip2Base.init_vision_encoder`` once; stock names are passed to LAVIS's code untouched."""
    base = blip2.Blip2Base
    if getattr(base, "_lavis_accel_vit_models", False):
        return
    stock_init_vision_encoder = base.init_vision_encoder.__func__

    def init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
        if model_name not in _VIT_MODELS:
            return stock_init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision)
        visual_encoder = build_eva_vit(model_name, img_size, drop_path_rate, use_grad_checkpoint, precision)
        return visual_encoder, blip2.LayerNorm(visual_encoder.num_features)

    base.init_vision_encoder = classmethod(init_vision_encoder)
    base._lavis_accel_vit_models = True


register_eva_vit("eva_vit_tiny", width=128, depth=4, num_heads=4, patch_size=16)
enable_plugin_vit_models()
