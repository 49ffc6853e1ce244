"""Annotation files and images checked while LAVIS builds the datasets: before the model is built, before any step.

LAVIS's dataset classes read annotation entries lazily, in ``__getitem__``: a missing image, an entry without a
``caption`` or a caption that is a number crashed a run in the middle of an epoch, or, in a test split, after every
epoch had trained. Here each split's annotation files are parsed and every entry checked for the fields its dataset
class reads, with the types it needs; every image is checked to exist and to open (its header: zero-byte, text,
unknown-format and decompression-bomb files fail), and truncated JPEG/PNG files are reported (LAVIS reads them as
grey). ``run.on_bad_sample`` decides what a bad entry does: ``error`` (the default) stops with one line naming the
file, the entry and the problem; ``skip`` leaves it out, logging each and the count, by giving LAVIS filtered copies
of the annotation files (in the job folder). ``run.check_images: False`` checks the annotations only.
"""
import contextlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from torch.utils.data import IterableDataset
from omegaconf import OmegaConf

from lavis.common.dist_utils import get_rank
from lavis.common.utils import get_cache_path
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis_accel.checkpoints import rng_state, set_rng_state
from lavis_accel.errors import SettingError

logger = logging.getLogger(__name__)

_IMAGE_THREADS = 8
_TAIL_BYTES = 64
_SHOWN = 5


def _text(value):
    return None if isinstance(value, str) else f"must be a string, not {type(value).__name__}"


def _texts(value):
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        return "must be a non-empty list of strings"
    return None


def _identifier(value):
    return None if isinstance(value, (str, int)) and not isinstance(value, bool) else "must be a string or integer"


def _label(value):
    return None if value in ("True", "False") else f"must be \"True\" or \"False\", not {value!r}"


def _two_images(value):
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, str) for v in value):
        return "must be a list of two image paths"
    return None


# What each LAVIS dataset class reads from an entry (its __init__ and __getitem__), and how it must look.
_PAIR = {"image": _text, "caption": _text, "image_id": _identifier}
ENTRY_FIELDS = {
    "RetrievalDataset": _PAIR,
    "RetrievalEvalDataset": {"image": _text, "caption": _texts},
    "CaptionDataset": _PAIR,
    "COCOCapDataset": _PAIR,
    "CaptionEvalDataset": {"image": _text, "image_id": _identifier},
    "COCOCapEvalDataset": {"image": _text},
    "ImageTextPairDataset": {"image": _text, "caption": _text},
    "COCOVQADataset": {"image": _text, "question": _text, "answer": _texts},
    "COCOVQAEvalDataset": {"image": _text, "question": _text, "question_id": _identifier},
    "NLVRDataset": {"images": _two_images, "sentence": _text, "label": _label},
    "NLVREvalDataset": {"images": _two_images, "sentence": _text, "label": _label},
}
# Classes that read entries from their first annotation file only (VQA eval: then the answer list, official files).
FIRST_FILE_ONLY = {"COCOVQAEvalDataset"}
GALLERY_CLASSES = {"RetrievalEvalDataset"}


def load_json_file(path, where, hint=""):
    """The JSON content of the annotation file ``path``; a file that cannot be read or parsed is refused in one line
    naming ``where`` (a setting) and the file, ``hint`` appended to a parse error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise SettingError(f"{where}: {path} is not valid JSON (line {err.lineno}, column {err.colno}: "
                           f"{err.msg}){hint}") from None
    except UnicodeDecodeError:
        raise SettingError(f"{where}: {path} is not a text (UTF-8) JSON file") from None
    except OSError as err:
        raise SettingError(f"{where}: {path} cannot be read: {err.strerror}") from None


def _read_entries(path, where):
    entries = load_json_file(path, where)
    if not isinstance(entries, list):
        raise SettingError(f"{where}: {path} must hold a JSON list of entries, not a {type(entries).__name__}")
    if not entries:
        raise SettingError(f"{where}: {path} has no entries")
    return entries


def _entry_problem(entry, fields):
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    for field, check in fields.items():
        if field not in entry:
            return f"has no '{field}'"
        problem = check(entry[field])
        if problem:
            return f"'{field}' {problem}"
    return None


def _image_paths(entry, vis_root):
    names = entry.get("images") if isinstance(entry.get("images"), list) else [entry.get("image")]
    return [os.path.join(vis_root, name) for name in names if isinstance(name, str)]


def _ends_whole(path, image_format):
    """Whether a JPEG ends with its end-of-image marker, a PNG with its IEND chunk (other formats: not checked)."""
    if image_format not in ("JPEG", "PNG"):
        return True
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - _TAIL_BYTES))
        tail = f.read().rstrip(b"\0\r\n ")
    return tail.endswith(b"\xff\xd9") if image_format == "JPEG" else b"IEND" in tail[-12:]


def inspect_image(path):
    """``(problem, truncated)`` for one image file: problem is None when it opens."""
    if not os.path.isfile(path):
        return "does not exist", False
    try:
        with Image.open(path) as image:
            image_format = image.format
    except Image.DecompressionBombError as err:
        return f"is too large to decode ({' '.join(str(err).split())[:80]})", False
    except (OSError, SyntaxError, ValueError) as err:
        return f"cannot be opened as an image ({' '.join(str(err).split())[:80]})", False
    return None, not _ends_whole(path, image_format)


class SplitCheck:
    """The check of one split of one dataset: its entries, their fields and their images."""

    def __init__(self, dataset, split, dataset_cls, ann_paths, vis_root):
        self.dataset, self.split = dataset, split
        self.where = f"datasets.{dataset}.build_info.annotations.{split}"
        self.fields = ENTRY_FIELDS.get(dataset_cls.__name__, {})
        self.is_gallery = dataset_cls.__name__ in GALLERY_CLASSES
        first_only = dataset_cls.__name__ in FIRST_FILE_ONLY
        self.entry_files = ann_paths[:1] if first_only else ann_paths
        self.vis_root = vis_root
        self.entries = {path: _read_entries(path, self.where) for path in self.entry_files}
        self.bad = {}  # (file, index) -> problem
        self.truncated = []

    def check_fields(self):
        for path, entries in self.entries.items():
            for index, entry in enumerate(entries):
                problem = _entry_problem(entry, self.fields)
                if problem:
                    self.bad[(path, index)] = problem

    def check_images(self, pool):
        wanted = {(path, index): _image_paths(entry, self.vis_root)
                  for path, entries in self.entries.items() for index, entry in enumerate(entries)
                  if (path, index) not in self.bad and isinstance(entry, dict)}
        unique = sorted({image for images in wanted.values() for image in images})
        results = dict(zip(unique, pool.map(inspect_image, unique)))
        self.truncated = [image for image, (_, truncated) in results.items() if truncated]
        for key, images in wanted.items():
            for image in images:
                problem = results[image][0]
                if problem:
                    self.bad[key] = f"image {image} {problem}"
                    break

    def names_images(self):
        """Whether the entries name image files (``image`` or ``images``); video datasets, say, do not."""
        return any(isinstance(entry, dict) and ("image" in entry or "images" in entry)
                   for entries in self.entries.values() for entry in entries[:1])

    def describe(self, key):
        path, index = key
        return f"{self.where}: {path} entry {index} {self.bad[key]}"

    def gallery_size(self):
        """Images and texts of a retrieval evaluation split, after bad entries are left out."""
        kept = [entry for path, entries in self.entries.items() for index, entry in enumerate(entries)
                if (path, index) not in self.bad]
        return len(kept), sum(len(entry["caption"]) for entry in kept)

    def filtered_files(self, directory):
        """Write the entry files without their bad entries into ``directory``; return the new annotation paths."""
        os.makedirs(directory, exist_ok=True)
        replaced = {}
        for number, (path, entries) in enumerate(self.entries.items()):
            kept = [entry for index, entry in enumerate(entries) if (path, index) not in self.bad]
            if len(kept) == len(entries):
                continue
            if not kept:
                raise SettingError(f"{self.where}: every entry of {path} is bad, e.g. entry 0 "
                                   f"{self.bad[(path, 0)]}")
            target = os.path.join(directory, f"{self.dataset}_{self.split}_{number}_{os.path.basename(path)}")
            with open(target, "w", encoding="utf-8") as f:
                json.dump(kept, f)
            replaced[path] = target
        return replaced


def _resolve(path):
    return path if os.path.isabs(path) else get_cache_path(path)


def _builder_name(builder):
    from lavis.common.registry import registry

    for name, cls in registry.mapping["builder_name_mapping"].items():
        if cls is type(builder):
            return name
    return type(builder).__name__


def check_builder(builder, run_cfg, job_dir, evaluated_splits):
    """Check every split of a file-based builder's datasets; in skip mode point it at filtered annotation files.

    ``evaluated_splits``: the splits this job evaluates, whose retrieval galleries must hold ``run.k_test`` items.
    """
    build_info = builder.config.build_info
    annotations = build_info.get("annotations")
    visual = build_info.get(builder.data_type)
    if not annotations or visual is None:
        return
    name = _builder_name(builder)
    on_bad_sample = run_cfg.get("on_bad_sample", "error")
    with ThreadPoolExecutor(_IMAGE_THREADS) as pool:
        for split in [s for s in annotations if s in ("train", "val", "test")]:
            dataset_cls = builder.train_dataset_cls if split == "train" else builder.eval_dataset_cls
            storage = annotations[split].storage
            paths = [_resolve(p) for p in ([storage] if isinstance(storage, str) else storage)]
            check = SplitCheck(name, split, dataset_cls, paths, _resolve(visual.storage))
            check.check_fields()
            if run_cfg.get("check_images", True) and check.names_images():
                check.check_images(pool)
            _report(check, on_bad_sample)
            if check.bad:
                replaced = check.filtered_files(os.path.join(job_dir, "checked_annotations", f"rank{get_rank()}"))
                annotations[split].storage = [replaced.get(p, p) for p in paths]
            _check_gallery(check, run_cfg, evaluated_splits)


def _report(check, on_bad_sample):
    if check.truncated:
        logger.warning("%s: %d image(s) are truncated and will be read with grey filling, e.g. %s", check.where,
                       len(check.truncated), ", ".join(check.truncated[:_SHOWN]))
    if not check.bad:
        return
    first = check.describe(next(iter(check.bad)))
    total = sum(len(entries) for entries in check.entries.values())
    if on_bad_sample == "error":
        raise SettingError(f"{first} ({len(check.bad)} of {total} entries are bad; run.on_bad_sample=skip leaves "
                           f"them out)")
    for key in check.bad:
        logger.warning("skipped: %s", check.describe(key))
    logger.warning("%s: skipped %d of %d entries (run.on_bad_sample=skip)", check.where, len(check.bad), total)


def _check_gallery(check, run_cfg, evaluated_splits):
    k_test = run_cfg.get("k_test")
    if not check.is_gallery or k_test is None or check.split not in evaluated_splits:
        return
    images, texts = check.gallery_size()
    if k_test > min(images, texts):
        raise SettingError(f"run.k_test {k_test} is larger than the {check.split} split of datasets.{check.dataset} "
                           f"({images} images, {texts} texts): set run.k_test to at most {min(images, texts)}")


@contextlib.contextmanager
def checking_datasets(run_cfg, job_dir, evaluated_splits):
    """While LAVIS builds the datasets, check each file-based builder's data after its download, before its build."""
    stock = BaseDatasetBuilder.build_datasets
    run_cfg = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=True))

    def build_datasets(self):
        class_build = type(self).build

        def checked_build():
            check_builder(self, run_cfg, job_dir, evaluated_splits)
            return class_build(self)

        self.build = checked_build
        try:
            return stock(self)
        finally:
            del self.build

    BaseDatasetBuilder.build_datasets = build_datasets
    try:
        yield
    finally:
        BaseDatasetBuilder.build_datasets = stock


def check_first_samples(datasets):
    """Read the first sample of every built map-style dataset, through its processors, before the model is built.

    A processor setting LAVIS cannot use (``image_size: 0``, say) otherwise fails at the first step of training, or
    of the first evaluation after it. ``datasets`` is what ``task.build_datasets`` returns: ``{name: {split: dataset}}``.
    The RNG states are restored afterwards (random crops draw from them), so the run's randomness is LAVIS's.
    """
    state = rng_state()
    try:
        _read_first_samples(datasets)
    finally:
        set_rng_state(state)


def _read_first_samples(datasets):
    for name, splits in datasets.items():
        for split, dataset in splits.items():
            if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not len(dataset):
                continue
            try:
                dataset[0]
            except Exception as err:  # noqa: BLE001  (any failure here is a setting or file the dataset cannot use)
                message = " ".join(str(err).split())[:200]
                raise SettingError(f"datasets.{name} ({split}): its first sample fails with {type(err).__name__}: "
                                   f"{message} (check its vis_processor and text_processor)") from err
