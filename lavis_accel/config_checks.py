"""Checks of a LAVIS project config before any work starts, each failing with one line that names the setting.

LAVIS itself reports most of these as bare ``assert`` failures or deep tracebacks (``'NoneType' object has no
attribute ...``), sometimes after minutes of model building; a wrong checkpoint is even loaded silently, its
mismatched tensors dropped.
"""
import contextlib
import difflib
import os

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lavis.common.registry import registry
from lavis.common.utils import get_cache_path, is_url
from lavis.models.base_model import BaseModel
from lavis_accel.checkpoints import loading_safely, names_a_file
from lavis_accel.errors import SettingError


def load_yaml(path, what="config file"):
    """Load a yaml file as a DictConfig, or fail naming the file (and the line, for a syntax error)."""
    if not os.path.isfile(path):
        raise SettingError(f"{what} not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise SettingError(f"{what} {path} is not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError:
        raise SettingError(f"{what} {path} is not a text file (not UTF-8): give a YAML file") from None
    except OSError as err:
        raise SettingError(f"{what} {path} cannot be read: {err.strerror}") from None
    if not isinstance(cfg, DictConfig):
        raise SettingError(f"{what} {path} must hold a mapping, not {type(cfg).__name__}")
    return cfg


def parse_options(options):
    """``--options k=v ...`` as LAVIS reads them, checked to be ``key=value`` pairs."""
    options = list(options or [])
    for opt in options:
        if "=" not in opt or opt.startswith("="):
            raise SettingError(f"--options: '{opt}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(options)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise SettingError(f"--options: {' '.join(str(err).split())}") from None


def _unknown(kind, name, known):
    close = difflib.get_close_matches(str(name), list(known), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return SettingError(f"{kind} '{name}' is not registered{hint}")


def check_project(cfg):
    """Check the sections, the model arch and type, the task and the dataset names of a merged project config."""
    for section in ("model", "datasets", "run"):
        if not isinstance(cfg.get(section), DictConfig):
            raise SettingError(f"config has no '{section}:' section")
    arch = cfg.model.get("arch")
    model_cls = registry.get_model_class(arch) if arch else None
    if model_cls is None:
        raise _unknown("model.arch", arch, registry.mapping["model_name_mapping"])
    model_type = cfg.model.get("model_type")
    types = model_cls.PRETRAINED_MODEL_CONFIG_DICT
    if model_type not in types:
        raise SettingError(f"model.model_type '{model_type}' is not a type of {arch}: one of {', '.join(types)}")
    task = cfg.run.get("task")
    if registry.get_task_class(task) is None:
        raise _unknown("run.task", task, registry.mapping["task_name_mapping"])
    if not cfg.datasets:
        raise SettingError("datasets: the config names no dataset")
    for name in cfg.datasets:
        if registry.get_builder_class(name) is None:
            raise _unknown("datasets", name, registry.mapping["builder_name_mapping"])
        if not isinstance(cfg.datasets[name], DictConfig):
            raise SettingError(f"datasets.{name} must be a mapping of the dataset's settings (at least {{}}), "
                               f"not {cfg.datasets[name]!r}")


def check_reducer_block(model_cfg):
    """A ``reducer:`` block is for an arch that binds a reducer (the plugin's variants); there it must be valid.

    LAVIS's own archs ignore keys they do not read, so a reducer block on ``blip_retrieval`` would silently do
    nothing. ``model_cfg`` is the merged model config (the arch's defaults below the project's). The block is built
    here, so a bad setting fails before any model or data is touched.
    """
    from lavis_accel.models.reduced import ReducedModel
    from lavis_accel.processors.reducers import build_reducer

    model_cls = registry.get_model_class(model_cfg.arch)
    reducer_cfg = model_cfg.get("reducer")
    if not issubclass(model_cls, ReducedModel):
        if reducer_cfg is not None:
            name = reducer_cfg.get("name") if isinstance(reducer_cfg, DictConfig) else None
            variants = _variants(model_cls, name)
            hint = f": use {' or '.join(variants)}" if variants else ""
            raise SettingError(f"model.reducer: {model_cfg.arch} has no token-reduction binding{hint}")
        return
    if reducer_cfg is not None:
        _check_method_binding(model_cfg.arch, model_cls, build_reducer(reducer_cfg).reducer_name)


def _method_classes():
    """The reducers that need a variant of their own (parameters the method trains), with the variants' mixin."""
    from lavis_accel.models.crossget_model import CrossGetModel
    from lavis_accel.models.madtp_model import MadtpModel

    return {"madtp": MadtpModel, "crossget": CrossGetModel}


def _runs(cls, reducer_name) -> bool:
    """Whether variant class ``cls`` runs a ``reducer_name`` block: a method's variants run that method only, the
    other variants (ToMe/Turbo) the reducers without parameters."""
    methods = _method_classes()
    own = [name for name, mixin in methods.items() if issubclass(cls, mixin)]
    return own == [reducer_name] if own else reducer_name not in methods


def _variants(lavis_class, reducer_name):
    """The registered variants of ``lavis_class`` that run a ``reducer_name`` block."""
    from lavis_accel.models.reduced import ReducedModel

    return [name for name, cls in registry.mapping["model_name_mapping"].items()
            if issubclass(cls, ReducedModel) and issubclass(cls, lavis_class) and _runs(cls, reducer_name)]


def _check_method_binding(arch, model_cls, reducer_name):
    """A madtp (crossget) block needs a MADTP (CrossGET) variant, and such a variant its own method's block."""
    from lavis_accel.models.reduced import ReducedModel

    if _runs(model_cls, reducer_name):
        return
    own = [name for name, mixin in _method_classes().items() if issubclass(model_cls, mixin)]
    if own:
        raise SettingError(f"model.reducer: {arch} takes a {own[0]} block, not {reducer_name!r}")
    lavis_parent = next(base for base in model_cls.__mro__ if not issubclass(base, ReducedModel))
    variants = _variants(lavis_parent, reducer_name)
    hint = f": use {' or '.join(variants)}" if variants else ""
    method = {"madtp": "MADTP", "crossget": "CrossGET"}[reducer_name]
    raise SettingError(f"model.reducer: {arch} has no {method} binding{hint}")


def _as_list(value):
    return [value] if isinstance(value, str) else list(value)


def check_processors(datasets_cfg):
    """Every ``vis_processor``/``text_processor`` a dataset names must be registered (LAVIS fails on ``None``)."""
    for name, dataset in datasets_cfg.items():
        for kind in ("vis_processor", "text_processor"):
            for split, processor in (dataset.get(kind) or {}).items():
                processor_name = processor.get("name") if isinstance(processor, DictConfig) else None
                if registry.get_processor_class(processor_name) is None:
                    raise _unknown(f"datasets.{name}.{kind}.{split}.name", processor_name,
                                   registry.mapping["processor_name_mapping"])


def check_dataset_paths(datasets_cfg):
    """Every annotation file and image folder a dataset reads must exist (annotations with a URL may be fetched),
    and whatever else its builder checks (``check_paths``: the shards of ``image_text_shards``)."""
    for name, dataset in datasets_cfg.items():
        build_info = dataset.get("build_info", {})
        for split, ann in build_info.get("annotations", {}).items():
            urls = ann.get("url")
            for storage in _as_list(ann.get("storage", [])):
                path = storage if os.path.isabs(storage) else get_cache_path(storage)
                if not os.path.exists(path) and not urls:
                    key = f"datasets.{name}.build_info.annotations.{split}.storage"
                    raise SettingError(f"{key}: {path} does not exist")
        builder_cls = registry.get_builder_class(name)
        data_type = dataset.get("data_type", "images")
        visual = build_info.get(data_type)
        if visual is not None and visual.get("storage") and getattr(builder_cls, "READS_VISUAL", True):
            path = visual.storage if os.path.isabs(visual.storage) else get_cache_path(visual.storage)
            if not os.path.exists(path):
                raise SettingError(f"datasets.{name}.build_info.{data_type}.storage: {path} does not exist")
        check_own_paths = getattr(builder_cls, "check_paths", None)  # e.g. tar shards
        if check_own_paths is not None:
            check_own_paths(name, dataset)


def checkpoint_paths(cfg):
    """The local checkpoint files a run will read, as ``{setting: path}`` (URLs are LAVIS's to download)."""
    model_cfg, paths = cfg.model, {}
    if model_cfg.get("load_finetuned", True):
        paths["model.finetuned"] = model_cfg.get("finetuned")
    elif model_cfg.get("load_pretrained", True):
        paths["model.pretrained"] = model_cfg.get("pretrained")
    paths["run.resume_ckpt_path"] = cfg.run.get("resume_ckpt_path")
    return {key: path for key, path in paths.items() if path and not is_url(path)}


def state_dict_misfit(model, state_dict, shapes_must_match=True):
    """Why ``state_dict`` does not fit ``model`` (no shared tensor name, or a shared tensor of another shape), or
    None when it fits."""
    model_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shared = [name for name in state_dict if name in model_shapes]
    if not shared:
        return f"shares no parameter names with {type(model).__name__}"
    if not shapes_must_match:
        return None
    mismatched = [name for name in shared
                  if torch.is_tensor(state_dict[name]) and tuple(state_dict[name].shape) != model_shapes[name]]
    if not mismatched:
        return None
    name = mismatched[0]
    return (f"does not fit {type(model).__name__}: {len(mismatched)} tensors differ in shape, e.g. {name} "
            f"{list(state_dict[name].shape)} in the file vs {list(model_shapes[name])} in the model")


MIN_PRETRAINED_SHARE = 0.5


def _unset_parameters_problem(model, result, key, load_strict):
    """Why a load that left ``result.missing_keys`` unset is refused, or None.

    Frozen parameters may be missing (LAVIS's runner does not save them), and so may the parameters a model class
    lists in ``PARAMETERS_STARTING_FRESH``. A fine-tuned file must set every other parameter; a pre-trained one at
    least half of the trainable weights (heads and projections may start fresh).
    """
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    fresh = set(getattr(model, "PARAMETERS_STARTING_FRESH", ()))  # e.g. MADTP's codebook: no stock file has it
    unset = [name for name in result.missing_keys if name in trainable and name not in fresh]
    if not unset or not load_strict:
        return None
    hint = "(--options model.load_strict=False accepts a partial load)"
    if key == "model.finetuned":
        return f"leaves {len(unset)} parameters of {type(model).__name__} unset, e.g. {unset[0]} {hint}"
    share = 1 - sum(trainable[name] for name in unset) / max(1, sum(trainable.values()))
    if share < MIN_PRETRAINED_SHARE:
        return (f"sets only {share:.0%} of the trainable weights of {type(model).__name__} ({len(unset)} parameters "
                f"unset, e.g. {unset[0]}) {hint}")
    return None


def checked_load_state_dict(model, key, path, shapes_must_match=True, load_strict=True):
    """``model.load_state_dict`` that refuses, in one line naming the setting, a state dict that does not fit (no
    shared names, other shapes) before loading it, and one that leaves too much of the model unset after."""
    stock_load = type(model).load_state_dict.__get__(model)

    def load_state_dict(state_dict, strict=True, **kwargs):
        problem = state_dict_misfit(model, state_dict, shapes_must_match)
        if problem:
            raise SettingError(f"{key}: {path} {problem}")
        result = stock_load(state_dict, strict=strict, **kwargs)
        problem = _unset_parameters_problem(model, result, key, load_strict)
        if problem:
            raise SettingError(f"{key}: {path} {problem}")
        return result

    return load_state_dict


@contextlib.contextmanager
def checking_model_checkpoints(cfg):
    """While a model is built, read checkpoints safely and check that what LAVIS loads from a local
    ``finetuned``/``pretrained`` file fits the model.

    Every ``torch.load`` of the build goes through ``checkpoints.safe_load`` (``weights_only=True``). LAVIS loads
    checkpoints inside ``from_config`` (``BaseModel.load_checkpoint_from_config``), after the model is constructed.
    For that call the model's ``load_state_dict`` refuses a misfit state dict, so the check sees exactly what LAVIS
    loads and no file is read twice. Pre-trained files are checked for shared names only: LAVIS deliberately drops
    their tensors of another shape (and interpolates position embeddings). ``model.load_strict: False`` accepts a
    load that leaves parameters unset.
    """
    paths = {key: path for key, path in checkpoint_paths(cfg).items() if key.startswith("model.")}
    stock = BaseModel.load_checkpoint_from_config

    def load_checkpoint_from_config(self, model_cfg, **kwargs):
        if not paths:
            return stock(self, model_cfg, **kwargs)
        ((key, path),) = paths.items()  # finetuned or pretrained, never both
        self.load_state_dict = checked_load_state_dict(self, key, path, shapes_must_match=key == "model.finetuned",
                                                       load_strict=model_cfg.get("load_strict", True))
        try:
            return stock(self, model_cfg, **kwargs)
        except KeyError as err:  # e.g. BLIP's pre-trained loader indexes the file's position embedding
            raise SettingError(f"{key}: {path} has no tensor {err} that {type(self).__name__} needs") from None
        finally:
            del self.load_state_dict

    BaseModel.load_checkpoint_from_config = load_checkpoint_from_config
    try:
        with loading_safely({path: key for key, path in paths.items()}):
            yield
    finally:
        BaseModel.load_checkpoint_from_config = stock


def model_weight_files(model_cfg):
    """Further local weight files a model config names (DLIP: the teacher's checkpoint, the ViT's DeiT start;
    P-Former: the stage-0 checkpoint)."""
    teacher = model_cfg.get("teacher") or {}
    paths = {"model.teacher.pretrained": teacher.get("pretrained"), "model.vit_pretrained": None,
             "model.pretrained_stage0": model_cfg.get("pretrained_stage0")}
    vit = model_cfg.get("vit_pretrained")
    if vit and names_a_file(vit):
        paths["model.vit_pretrained"] = vit  # otherwise a timm model name
    return {key: str(path) for key, path in paths.items() if path and not is_url(str(path))}


def check_checkpoint_files(cfg):
    """The run names the weights its arch needs, and every local checkpoint file it will read exists (checked
    before any work)."""
    model_cls = registry.get_model_class(cfg.model.get("arch"))
    unnamed = getattr(model_cls, "unnamed_weights", None)  # archs without published weights (DLIP's students)
    problem = unnamed(cfg.model) if unnamed is not None else None
    if problem:
        raise SettingError(problem)
    for key, path in {**checkpoint_paths(cfg), **model_weight_files(cfg.model)}.items():
        if not os.path.isfile(path):
            raise SettingError(f"{key}: checkpoint file not found: {path}")
