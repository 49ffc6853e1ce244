"""Synthetic image-caption pairs for LAVIS's pretraining builders (``conceptual_caption_3m``, ``sbu_caption``,
``vg_caption``, ...), which read one annotation list with its ``ImageTextPairDataset``: entries ``{image, caption}``,
a train split only.

The entries follow LAVIS's files: one caption per image for CC3M and SBU; for Visual Genome, many region
descriptions of one image (here: every phrasing of the scene), each entry with the ``image_id`` of its image.
"""
import os

from lavis_accel.datasets.language import captions
from lavis_accel.datasets.synthetic import (
    _check_settings, _dataset_entry, _image_name, _local, _save_image, _scenes_by_split, _write_json,
)

# dataset name -> (annotation file name as in LAVIS's default yaml, every phrasing of a scene or one)
PAIR_DATASETS = {
    "conceptual_caption_3m": ("cc3m.json", False),
    "conceptual_caption_12m": ("cc12m.json", False),
    "sbu_caption": ("sbu.json", False),
    "vg_caption": ("vg_caption.json", True),
}


def write_image_text_pairs(root, name, n=200, image_size=96, seed=0):
    """Write ``n`` images and the annotation list of pretraining dataset ``name`` (a key of :data:`PAIR_DATASETS`)
    under ``<root>/<name>``; return its ``datasets:`` entry (a train split)."""
    if name not in PAIR_DATASETS:
        raise ValueError(f"name must be one of {', '.join(PAIR_DATASETS)}, got {name!r}")
    _check_settings({"train": n}, image_size)
    file_name, every_phrasing = PAIR_DATASETS[name]
    dataset_dir = os.path.join(os.path.abspath(root), name)
    image_dir = os.path.join(dataset_dir, "images")
    entries = []
    for image_id, scene in _scenes_by_split({"train": n}, seed)["train"]:
        image = _image_name("train", image_id)
        _save_image(scene, image_dir, image, image_size)
        phrasings = captions(scene)
        chosen = phrasings if every_phrasing else [phrasings[image_id % len(phrasings)]]
        ids = {"image_id": image_id} if every_phrasing else {}
        entries += [{"image": image, "caption": caption, **ids} for caption in chosen]
    path = _write_json(os.path.join(dataset_dir, "annotations", file_name), entries)
    return _dataset_entry(name, {"train": _local(path)}, image_dir, image_size, "blip_caption")
