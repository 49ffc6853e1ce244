"""Start a BLIP ViT from ImageNet weights in timm's layout (DLIP's student starts from DeiT-S).

``vit_pretrained`` in a model config names the weights: a local file (a DeiT release ``{"model": state_dict}``, a
plain state dict, or timm's ``state_dict()`` saved with ``torch.save``) or a timm model name
(``deit_small_patch16_224``), which timm loads from its local cache. LAVIS's ``VisionTransformer`` uses timm's
parameter names, so the weights load as they are: the classifier head is left out and the position embedding is
interpolated to the model's image size (as LAVIS does for BLIP checkpoints).

A local file that is missing or does not fit is an error; a timm name whose weights are not at hand (offline, not
cached) leaves the ViT random with a warning, so a run without internet still starts.
"""
import logging

from lavis.models.vit import interpolate_pos_embed

from lavis_accel.checkpoints import names_a_file, safe_load
from lavis_accel.errors import SettingError

logger = logging.getLogger(__name__)

SETTING = "model.vit_pretrained"
def _state_dict_of(obj, path):
    """The ViT state dict inside a loaded checkpoint object (DeiT releases wrap it in ``model``)."""
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise SettingError(f"{SETTING}: {path} holds no state dict")
    return obj


def _timm_state_dict(name):
    """timm's pretrained weights for ``name``, or None (with a warning) when they cannot be loaded here."""
    import timm  # imported late: timm imports torchvision, which lavis_accel.compat must fix first

    if not timm.is_model(name):
        raise SettingError(f"{SETTING}: '{name}' is neither a local checkpoint file nor a timm model name")
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as err:  # noqa: BLE001  (offline: URLError, OSError, RuntimeError, ... depending on the hub)
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        logger.warning("%s: the weights of '%s' are not at hand (timm could not load them: %s); the ViT starts "
                       "from random weights", SETTING, name, reason)
        return None


def _fitted(state_dict, vit, source):
    """``state_dict`` restricted to the ViT's names, position embedding resized; refuses other shapes."""
    own = vit.state_dict()
    fitted = {name: tensor for name, tensor in state_dict.items() if name in own}
    if "pos_embed" in fitted and fitted["pos_embed"].shape != own["pos_embed"].shape:
        fitted["pos_embed"] = interpolate_pos_embed(fitted["pos_embed"], vit)
    wrong = [name for name, tensor in fitted.items() if tuple(tensor.shape) != tuple(own[name].shape)]
    if wrong:
        name = wrong[0]
        raise SettingError(f"{SETTING}: {source} does not fit the ViT: {name} {list(fitted[name].shape)} in the file "
                           f"vs {list(own[name].shape)} in the model ({len(wrong)} tensors differ)")
    missing = [name for name in own if name not in fitted]
    if missing:
        raise SettingError(f"{SETTING}: {source} leaves {len(missing)} ViT tensors unset, e.g. {missing[0]}")
    return fitted


def load_vit_pretrained(vit, name):
    """Load ``name`` (a file or a timm model name; None or "" loads nothing) into the BLIP ViT ``vit``.

    Returns True when weights were loaded.
    """
    if not name:
        logger.info("%s: not set, the ViT starts from random weights", SETTING)
        return False
    name = str(name)
    if names_a_file(name):
        state_dict = _state_dict_of(safe_load(name, SETTING), name)
    else:
        state_dict = _timm_state_dict(name)
        if state_dict is None:
            return False
    vit.load_state_dict(_fitted(state_dict, vit, name))
    logger.info("%s: the ViT starts from %s", SETTING, name)
    return True
