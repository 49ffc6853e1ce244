"""Tiny, randomly initialised LAVIS models built through LAVIS's own registry and ``from_config``.

:func:`tiny_model_config` gives the config keys that shrink a model of a LAVIS family (BLIP, BLIP-2, CLIP, and any
registered subclass of them, such as the plugin's variants); :func:`build_tiny` loads the arch's default yaml for a
model type, applies those keys, and calls ``from_config``, as LAVIS's ``load_model`` does with a real checkpoint.
Project yamls and the demo use the same keys, so a tiny model built here and one built by LAVIS's runner match.

BLIP and BLIP-2 fetch tokenizers and the Q-Former's BERT from the hub: building them needs the offline hub of
:mod:`lavis_accel.testing.hub` to be active (its environment set before transformers was imported).
"""
import json
import os

import torch
from lavis.common.registry import registry
from lavis.common.utils import get_abs_path
from lavis.models import load_preprocess
from lavis.models.blip2_models.blip2 import Blip2Base
from lavis.models.blip_models.blip import BlipBase
from lavis.models.blip_models.blip_pretrain import BlipPretrain
from lavis.models.clip_models.model import CLIP
from omegaconf import OmegaConf

from lavis_accel.models.clip_types import TINY_CLIP_TYPE
from lavis_accel.models.crossget_model import CrossGetModel
from lavis_accel.models.dlip_teacher import teacher_class_and_config
from lavis_accel.models.pformer_net import build_pformer, llm_width
from lavis_accel.models.pretrain_build import build_pretrain_model
from lavis_accel.configs import packaged_config
from lavis_accel.models.vit_types import vit_type_size
from lavis_accel.testing import hub

TINY_IMAGE_SIZE = 96
TINY_VIT_TYPE = "tiny"
TINY_EVA_VIT = "eva_vit_tiny"
TINY_NUM_QUERY_TOKEN = 8
TINY_QUEUE_SIZE = 256  # divisible by every power-of-two batch size up to 256
TINY_EMBED_DIM = 128
STOCK_VIT_DEPTHS = {"base": 12, "large": 24, "small": 12}


TINY_MED_CONFIG = packaged_config("med_config_tiny.json")


def _family(model_cls):
    for family, base in (("blip2", Blip2Base), ("blip", BlipBase), ("clip", CLIP)):
        if issubclass(model_cls, base):
            return family
    raise ValueError(f"arch: no tiny configuration for {model_cls.__name__} (BLIP, BLIP-2 and CLIP families only)")


def _tiny_clip_type(model_cls):
    """The tiny CLIP type of a CLIP-family arch: its own ``TINY_MODEL_TYPE`` if it names one, else the shared one."""
    return getattr(model_cls, "TINY_MODEL_TYPE", TINY_CLIP_TYPE)


def _default_model_type(model_cls, family):
    return _tiny_clip_type(model_cls) if family == "clip" else next(iter(model_cls.PRETRAINED_MODEL_CONFIG_DICT))


def parent_config(arch, model_type=None):
    """The ``model`` section of the arch's default yaml for ``model_type`` (its first type when None)."""
    model_cls = registry.get_model_class(arch)
    if model_cls is None:
        raise ValueError(f"arch: '{arch}' is not a registered LAVIS model")
    model_type = model_type or _default_model_type(model_cls, _family(model_cls))
    return OmegaConf.load(model_cls.default_config_path(model_type)).model


def _scaled_ckpt_layer(parent):
    """Gradient-checkpoint the same share of the tiny ViT's blocks as the parent does of its own (at least one)."""
    parent_layers = parent.get("vit_ckpt_layer", 0)
    if not parent.get("vit_grad_ckpt", False) or not parent_layers:
        return parent_layers
    tiny_depth = vit_type_size(TINY_VIT_TYPE)["depth"]
    parent_depth = STOCK_VIT_DEPTHS.get(parent.get("vit_type", "base"), tiny_depth)
    return max(1, min(tiny_depth, round(parent_layers * tiny_depth / parent_depth)))


def tiny_model_config(arch, model_type=None):
    """The model config keys (a plain dict) that make ``arch``/``model_type`` tiny and randomly initialised."""
    parent = parent_config(arch, model_type)
    family = _family(registry.get_model_class(arch))
    if family == "clip":
        return {"model_type": _tiny_clip_type(registry.get_model_class(arch)), "pretrained": ""}
    tiny = {"load_finetuned": False, "load_pretrained": False, "image_size": TINY_IMAGE_SIZE}
    if family == "blip":
        tiny.update(vit_type=TINY_VIT_TYPE, med_config_path=TINY_MED_CONFIG, vit_ckpt_layer=_scaled_ckpt_layer(parent))
        if "queue_size" in parent:
            tiny.update(queue_size=TINY_QUEUE_SIZE)
        if "embed_dim" in parent:
            tiny.update(embed_dim=TINY_EMBED_DIM)
        if issubclass(registry.get_model_class(arch), CrossGetModel):
            tiny.update(vit_depth=_tiny_text_layers())  # CrossGET's loss pairs ViT blocks with text layers
        if "vit_pretrained" in parent:
            tiny.update(vit_pretrained=None)  # DLIP's student: no DeiT weights at tiny size
        if parent.get("teacher"):
            tiny.update(teacher=tiny_teacher_config(parent.teacher))
    else:
        tiny.update(vit_model=TINY_EVA_VIT, num_query_token=TINY_NUM_QUERY_TOKEN)
        if getattr(registry.get_model_class(arch), "TEXT_LENGTH_IS_QUERY_COUNT", False):
            tiny.update(max_txt_len=TINY_NUM_QUERY_TOKEN)  # P-Former: one prompt per token of the padded sentence
        if "opt_model" in parent:
            tiny.update(opt_model=hub.TINY_OPT_REPO)
        if "t5_model" in parent:
            tiny.update(t5_model=hub.TINY_T5_REPO)
    return tiny


def tiny_teacher_config(teacher):
    """A DLIP ``teacher:`` block made tiny (same arch and type; its ``pretrained`` file is the caller's to set)."""
    arch, model_type = teacher.get("arch", "blip_pretrain"), teacher.get("model_type")
    return {**teacher, **tiny_model_config(arch, model_type), "arch": arch, "model_type": model_type}


TINY_TEACHER_SEED = 0


def write_tiny_teacher(teacher_block, path):
    """Write a tiny, randomly initialised DLIP teacher as a checkpoint file and return ``path``.

    ``teacher_block`` is a ``model.teacher`` block of ``dlip_pretrain`` (arch, model type, config keys); it is made
    tiny as :func:`tiny_teacher_config` does (a block that already is stays the same). The file holds
    ``{"model": state_dict}``, as BLIP's released checkpoints do, so a tiny student's ``model.teacher.pretrained``
    can name it; give the block of the tiny config that will read the file (``testing.projects.tiny_project``'s,
    which also shrinks the teacher's unused queues), so that their shapes match. A ``blip_pretrain``-class teacher
    is built with ``pretrain_build.build_pretrain_model`` (its own ``from_config`` would download ImageNet ViT and
    BERT weights); any other BLIP arch with ``from_config``. Needs the offline hub (the teacher's tokenizer); the
    weights are seeded, and the global torch RNG is left as it was.
    """
    tiny_block = tiny_teacher_config(OmegaConf.create(teacher_block))
    model_cls, cfg = teacher_class_and_config(OmegaConf.create(tiny_block))
    _check_offline_hub(_family(model_cls), cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_TEACHER_SEED)
        if issubclass(model_cls, BlipPretrain):
            teacher = build_pretrain_model(model_cls, cfg)
        else:
            teacher = model_cls.from_config(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"model": teacher.state_dict()}, path)
    return str(path)


def write_tiny_stage0(model_cfg, path):
    """Write a tiny random P-Former stage-0 checkpoint (``{"model": {"Pformer.*": ...}}``) and return ``path``.

    It fits the tiny P-Former stage-1/2 model of ``model_cfg`` (a config as ``tiny_model_config`` makes it: its
    ``num_query_token`` prompts of the width of its ``opt_model`` or ``t5_model``), so that model's
    ``pretrained_stage0`` can name it. Needs the offline hub; seeded, the global torch RNG left as it was.
    """
    kind, name = ("t5", model_cfg.get("t5_model")) if model_cfg.get("t5_model") else ("opt", model_cfg.get("opt_model"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_TEACHER_SEED)
        pformer = build_pformer(model_cfg.get("num_query_token"), kind, llm_width(kind, name), contrastive=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"model": {f"Pformer.{key}": value for key, value in pformer.state_dict().items()}}, path)
    return str(path)


def _tiny_text_layers() -> int:
    with open(TINY_MED_CONFIG, encoding="utf-8") as f:
        return json.load(f)["num_hidden_layers"]


def _check_offline_hub(family, cfg):
    if family == "clip":
        return
    active = hub.active_hub()
    if active is None:
        raise RuntimeError("offline hub: none is active; write_offline_hub(root) and start the process with "
                           "offline_env(root) set (see lavis_accel.testing.hub)")
    if family == "blip":
        with open(get_abs_path(cfg.med_config_path), encoding="utf-8") as f:
            vocab_size = json.load(f)["vocab_size"]
        needed = active["bert_vocab_size"] + 2  # BLIP adds [DEC] and [ENC]
        if vocab_size < needed:
            raise ValueError(f"med_config_path: vocab_size {vocab_size} is below the {needed} tokens of the offline "
                             f"hub's tokenizer (bert_vocab_size {active['bert_vocab_size']})")


def tiny_config(arch, model_type=None, **overrides):
    """The full model config ``build_tiny`` uses: default yaml, then :func:`tiny_model_config`, then overrides."""
    cfg = parent_config(arch, model_type)
    cfg = OmegaConf.merge(cfg, tiny_model_config(arch, model_type), overrides)
    cfg.arch = arch
    return cfg


def build_tiny(arch, model_type=None, *, is_eval=False, device="cpu", **overrides):
    """Build a tiny random ``arch`` model (``model_type``: its default yaml) through ``from_config``.

    ``overrides`` are model config keys applied last (e.g. ``vit_depth=2``, ``image_size=64``). Like LAVIS's
    ``load_model``, on the CPU the model is cast to float32 (BLIP-2 keeps its ViT in fp16 and T5 in bf16 otherwise).
    """
    model_cls = registry.get_model_class(arch)
    cfg = tiny_config(arch, model_type, **overrides)
    _check_offline_hub(_family(model_cls), cfg)
    model = model_cls.from_config(cfg)
    if is_eval:
        model.eval()
    if str(device) == "cpu":
        model = model.float()
    return model.to(device)


def load_tiny_model_and_preprocess(arch, model_type=None, *, is_eval=False, device="cpu", **overrides):
    """Like LAVIS's ``load_model_and_preprocess``, for a tiny model: ``(model, vis_processors, txt_processors)``.

    The processors are the default yaml's, with every image processor's ``image_size`` set to the model's.
    """
    model = build_tiny(arch, model_type, is_eval=is_eval, device=device, **overrides)
    model_type = model_type or _default_model_type(registry.get_model_class(arch), _family(type(model)))
    preprocess = OmegaConf.load(registry.get_model_class(arch).default_config_path(model_type)).preprocess
    image_size = tiny_config(arch, model_type, **overrides).get("image_size", TINY_IMAGE_SIZE)
    for split in preprocess.get("vis_processor", {}).values():
        split.image_size = image_size
    vis_processors, txt_processors = load_preprocess(preprocess)
    return model, vis_processors, txt_processors
