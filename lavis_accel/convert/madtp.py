"""``lavis-accel convert madtp CKPT OUT``: a released MADTP checkpoint, made loadable by the plugin's MADTP models.

MADTP's ``compress_*_dtp.py`` save ``{"model": state_dict, "epoch": ..., "temperature": tau}``. The state dict is
- for the BLIP tasks (NLVR2, caption, VQA, retrieval): the BLIP repository's keys, which LAVIS's BLIP models share,
  plus the codebook ``space_dict`` (BLIP's query modules have no weights);
- for CLIP: OpenAI's CLIP keys, which LAVIS's CLIP shares, plus each block's query projection
  ``[visual.]transformer.resblocks.{i}.query_model.q_map.0.{weight,bias}``, momentum copies of both towers
  (``visual_m``, ``transformer_m``, ``token_embedding_m``, ...) and the contrastive queues.

The converted file is ``{"model": state_dict}``: ``space_dict`` becomes ``madtp_codebook``, tau the 0-dim
``madtp_temperature``, CLIP's projections ``madtp_image_queries.{i}`` / ``madtp_text_queries.{i}``, and the BLIP
repository's ``ptr_queue`` LAVIS's name for it, ``queue_ptr``. CLIP's momentum copies and queues are dropped: LAVIS's
CLIP has neither. Every other key is kept unchanged. The layout is detected from the keys; a checkpoint with a key
that fits no part of it, with no codebook, or (unless ``--temperature`` is given) with no tau is refused in one line,
before anything is written.
"""
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from lavis_accel.checkpoints import safe_load, save_atomically
from lavis_accel.errors import SettingError

CODEBOOK = "madtp_codebook"
TEMPERATURE = "madtp_temperature"
SHOWN_KEYS = 5  # unmatched keys named in a refusal

# Key grammars (full matches) of the towers, as LAVIS's models name their weights.
_WB = r"(weight|bias)"
_VIT = (rf"(cls_token|pos_embed|patch_embed\.proj\.{_WB}|norm\.{_WB}"
        rf"|blocks\.\d+\.(norm[12]|attn\.(qkv|proj)|mlp\.fc[12])\.{_WB})")
_EMBEDDINGS = rf"embeddings\.((word|position)_embeddings\.weight|LayerNorm\.{_WB}|position_ids)"
_SELF_ATTENTION = rf"attention\.(self\.(query|key|value)|output\.(dense|LayerNorm))\.{_WB}"
_CROSS_ATTENTION = rf"crossattention\.(self\.(query|key|value)|output\.(dense|LayerNorm))\.{_WB}"
_TWIN_CROSS_ATTENTION = (rf"crossattention\.(self[01]\.(query|key|value)|output\.(dense[01]|merge_layer|LayerNorm))"
                         rf"\.{_WB}")  # NLVR2's encoder: one cross-attention per image
_FEED_FORWARD = rf"(intermediate\.dense|output\.(dense|LayerNorm))\.{_WB}"


def _bert(cross_attention):
    """The keys of a BLIP ``med`` BERT whose layers cross-attend with ``cross_attention``."""
    return rf"({_EMBEDDINGS}|encoder\.layer\.\d+\.({_SELF_ATTENTION}|{cross_attention}|{_FEED_FORWARD}))"


_DECODER = (rf"(bert\.{_bert(_CROSS_ATTENTION)}"
            rf"|cls\.predictions\.(bias|decoder\.{_WB}|transform\.(dense|LayerNorm)\.{_WB}))")
_CLIP_BLOCK = (rf"resblocks\.\d+\.(attn\.(in_proj_(weight|bias)|out_proj\.{_WB})|ln_[12]\.{_WB}"
               rf"|mlp\.c_(fc|proj)\.{_WB})")
_CLIP_VISUAL = (rf"(class_embedding|positional_embedding|proj|conv1\.weight|ln_(pre|post)\.{_WB}"
                rf"|transformer\.{_CLIP_BLOCK})")
_CLIP_TEXT = (rf"(transformer\.{_CLIP_BLOCK}|token_embedding\.weight|positional_embedding|ln_final\.{_WB}"
              rf"|text_projection)")
_CLIP_QUERY = rf"resblocks\.(\d+)\.query_model\.q_map\.0\.{_WB}"  # groups: block index, weight/bias
_CLIP_MOMENTUM = (rf"(visual_m\.({_CLIP_VISUAL}|transformer\.{_CLIP_QUERY})"
                  rf"|transformer_m\.({_CLIP_BLOCK}|{_CLIP_QUERY})|token_embedding_m\.weight|ln_final_m\.{_WB}"
                  rf"|(text_projection|positional_embedding)_m|(image|text|idx)_queue|ptr_queue)")
_MATCHES_NOTHING = r"(?!)"
_CODEBOOK_RENAME = (r"space_dict", CODEBOOK)


@dataclass(frozen=True)
class Layout:
    """One MADTP model family: which keys mark it, and what becomes of each of its keys.

    A key is renamed by the first of ``renames`` (pattern, replacement) that fully matches it, else kept if
    ``keep`` matches, else dropped if ``drop`` matches; any other key does not fit the layout. ``codebook_width``
    (pattern, dim) names the converted tensors whose size along ``dim`` is the width the codebook must have;
    ``per_block`` (block pattern, templates) names the keys every block matched by the pattern must have.
    """

    name: str
    markers: tuple
    keep: str
    renames: tuple = (_CODEBOOK_RENAME,)
    drop: str = _MATCHES_NOTHING
    dropped_what: str = ""
    codebook_width: tuple = (r"visual_encoder\.pos_embed", -1)
    per_block: tuple = ()

    @property
    def arch(self):
        """The plugin's registered arch that loads the converted checkpoint."""
        return f"{self.name}_madtp"


LAYOUTS = (
    Layout("blip_nlvr", markers=("visual_encoder.", "text_encoder.", "cls_head."),
           keep=rf"(visual_encoder\.{_VIT}|text_encoder\.{_bert(_TWIN_CROSS_ATTENTION)}|cls_head\.\d+\.{_WB})"),
    Layout("blip_retrieval", markers=("visual_encoder.", "visual_encoder_m.", "text_encoder.", "itm_head."),
           keep=(rf"(visual_encoder(_m)?\.{_VIT}|text_encoder(_m)?\.{_bert(_CROSS_ATTENTION)}"
                 rf"|(vision|text)_proj(_m)?\.{_WB}|itm_head\.{_WB}|temp|(image|text|idx)_queue)"),
           renames=(_CODEBOOK_RENAME, (r"ptr_queue", "queue_ptr"))),
    Layout("blip_vqa", markers=("visual_encoder.", "text_encoder.", "text_decoder."),
           keep=rf"(visual_encoder\.{_VIT}|text_encoder\.{_bert(_CROSS_ATTENTION)}|text_decoder\.{_DECODER})"),
    Layout("blip_caption", markers=("visual_encoder.", "text_decoder."),
           keep=rf"(visual_encoder\.{_VIT}|text_decoder\.{_DECODER})"),
    Layout("clip", markers=("visual.transformer.resblocks.", "transformer.resblocks."),
           keep=rf"(visual\.{_CLIP_VISUAL}|{_CLIP_TEXT}|logit_scale)",
           renames=(_CODEBOOK_RENAME, (rf"visual\.transformer\.{_CLIP_QUERY}", r"madtp_image_queries.\1.\2"),
                    (rf"transformer\.{_CLIP_QUERY}", r"madtp_text_queries.\1.\2")),
           drop=_CLIP_MOMENTUM, dropped_what="momentum towers and queues: LAVIS's CLIP has none",
           codebook_width=(r"madtp_(image|text)_queries\.\d+\.weight", 0),
           per_block=((r"visual\.transformer\.resblocks\.(\d+)\.ln_1\.weight",
                       ("madtp_image_queries.{}.weight", "madtp_image_queries.{}.bias")),
                      (r"transformer\.resblocks\.(\d+)\.ln_1\.weight",
                       ("madtp_text_queries.{}.weight", "madtp_text_queries.{}.bias")))),
)


@dataclass(frozen=True)
class Conversion:
    """A converted state dict and what the conversion did."""

    layout: Layout
    state: dict
    temperature: float
    temperature_given: bool
    kept: int
    renamed: int
    dropped: int

    def summary(self, out):
        """One line: layout, tau and the key counts."""
        given = " (from --temperature)" if self.temperature_given else ""
        dropped = f" ({self.layout.dropped_what})" if self.dropped else ""
        return (f"converted a MADTP {self.layout.name} checkpoint for arch {self.layout.arch}: tau {self.temperature:g}"
                f"{given}; {self.kept} keys kept, {self.renamed} renamed, {self.dropped} dropped{dropped}, "
                f"{TEMPERATURE} added -> {out}")


def _fate(layout, key):
    """``(what happens, new key)`` for ``key``: kept, renamed, dropped (new key None) or unmatched (None)."""
    for pattern, replacement in layout.renames:
        match = re.fullmatch(pattern, key)
        if match:
            return "renamed", match.expand(replacement)
    if re.fullmatch(layout.keep, key):
        return "kept", key
    if re.fullmatch(layout.drop, key):
        return "dropped", None
    return "unmatched", None


def _unmatched(layout, keys):
    return [key for key in keys if _fate(layout, key)[0] == "unmatched"]


def _missing_markers(layout, keys):
    return [marker for marker in layout.markers if not any(key.startswith(marker) for key in keys)]


def _shown(keys):
    more = f", ... ({len(keys)} in all)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def detect_layout(keys, source="checkpoint"):
    """The layout whose marker keys are all present and into which every key fits; else refused in one line,
    naming the closest layout's unmatched keys."""
    keys = list(keys)

    def misfit(layout):
        return len(_unmatched(layout, keys)) + len(_missing_markers(layout, keys))

    closest = min(LAYOUTS, key=misfit)
    unmatched = _unmatched(closest, keys)
    known = ", ".join(layout.name for layout in LAYOUTS)
    if unmatched:
        raise SettingError(f"CKPT: {source} fits no MADTP checkpoint layout ({known}); against the closest, "
                           f"{closest.name}, {len(unmatched)} keys fit no known name: {_shown(unmatched)}")
    missing = _missing_markers(closest, keys)
    if missing:
        raise SettingError(f"CKPT: {source} fits no MADTP checkpoint layout ({known}); the closest, {closest.name}, "
                           f"needs keys starting {', '.join(missing)}")
    return closest


def _state_dict(checkpoint, source):
    """The ``model`` state dict of a MADTP checkpoint, refused in one line if it has none or holds non-tensors."""
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise SettingError(f"CKPT: {source} holds no 'model' state dict (MADTP saves {{'model': state_dict, "
                           f"'temperature': tau, ...}})")
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise SettingError(f"CKPT: {source} has 'model' entries that are not tensors: {_shown(not_tensors)}")
    return state


def _temperature(checkpoint, given, source):
    """tau: ``given`` if not None, else the checkpoint's ``temperature``; a finite number >= 0."""
    setting = "--temperature" if given is not None else f"CKPT: {source} 'temperature'"
    value = given if given is not None else checkpoint.get("temperature")
    if value is None:
        raise SettingError(f"CKPT: {source} has no 'temperature' (MADTP's tau): give it with --temperature")
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise SettingError(f"{setting} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_codebook(state, layout, source):
    """The codebook is a 2-D floating tensor as wide as the tokens (or CLIP's query projections) it meets."""
    if CODEBOOK not in state:
        raise SettingError(f"CKPT: {source} has no 'space_dict' (MADTP's codebook), so it is not a MADTP checkpoint "
                           f"(a stock LAVIS checkpoint loads into {layout.arch} unchanged)")
    codebook = state[CODEBOOK]
    if codebook.dim() != 2 or not codebook.is_floating_point():
        raise SettingError(f"CKPT: {source} 'space_dict' must be a [codes, width] float tensor, got "
                           f"{tuple(codebook.shape)} {codebook.dtype}")
    pattern, dim = layout.codebook_width
    for key, tensor in state.items():
        if re.fullmatch(pattern, key) and tensor.shape[dim] != codebook.shape[1]:
            raise SettingError(f"CKPT: {source} 'space_dict' is {codebook.shape[1]} wide, but {key} has "
                               f"{tensor.shape[dim]} features")


def _check_blocks(state, layout, source):
    """Every block of a tower has the per-block keys the layout requires (CLIP's query projections)."""
    for block_pattern, templates in layout.per_block:
        blocks = [match.group(1) for match in (re.fullmatch(block_pattern, key) for key in state) if match]
        missing = [template.format(block) for block in blocks for template in templates
                   if template.format(block) not in state]
        if missing:
            raise SettingError(f"CKPT: {source} lacks the query projections of some blocks (converted names): "
                               f"{_shown(missing)}")


def convert_checkpoint(checkpoint, temperature: Optional[float] = None, source="checkpoint") -> Conversion:
    """Convert a loaded MADTP checkpoint (see the module docstring); ``temperature`` overrides its tau."""
    state = _state_dict(checkpoint, source)
    layout = detect_layout(state, source)
    converted, counts = {}, {"kept": 0, "renamed": 0, "dropped": 0}
    for key, tensor in state.items():
        fate, new_key = _fate(layout, key)
        counts[fate] += 1
        if new_key is not None:
            converted[new_key] = tensor
    _check_codebook(converted, layout, source)
    _check_blocks(converted, layout, source)
    tau = _temperature(checkpoint, temperature, source)
    converted[TEMPERATURE] = torch.tensor(tau, dtype=torch.float64)  # exact: MADTP's tau is a python float
    return Conversion(layout, converted, tau, temperature is not None, **counts)


def _check_out(out, force):
    """OUT is a file path in an existing directory, and not an existing file unless ``force``."""
    if os.path.isdir(out):
        raise SettingError(f"OUT: {out} is a directory; give the path of the file to write")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise SettingError(f"OUT: directory {directory} does not exist")
    if os.path.exists(out) and not force:
        raise SettingError(f"OUT: {out} exists; pass --force to overwrite it")


def convert(ckpt, out, temperature: Optional[float] = None, force: bool = False) -> Conversion:
    """Read the MADTP checkpoint ``ckpt`` safely, convert it, write ``{"model": state_dict}`` to ``out``
    atomically (nothing is written when any check fails)."""
    _check_out(out, force)
    conversion = convert_checkpoint(safe_load(ckpt, "CKPT"), temperature=temperature, source=ckpt)
    save_atomically(torch.save)({"model": conversion.state}, out)
    return conversion


def add_arguments(parser):
    parser.add_argument("ckpt", metavar="CKPT", help="the MADTP checkpoint (compress_*_dtp.py's checkpoint_best.pth)")
    parser.add_argument("out", metavar="OUT", help="the file to write: {'model': state_dict} for the *_madtp archs")
    parser.add_argument("--temperature", type=float, default=None, metavar="TAU",
                        help="tau to store; needed when CKPT has no 'temperature', overrides it otherwise")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    return parser


def run(args):
    """The CLI job: convert and print the one-line summary."""
    print(convert(args.ckpt, args.out, temperature=args.temperature, force=args.force).summary(args.out))
    return 0
