"""The synthetic data a dry-run writes: each dataset a project names, written by the writer of its LAVIS format.

A dataset is written by a writer of ``lavis_accel.datasets`` when LAVIS reads it with the same dataset classes as
that writer's dataset (so the same annotation format): Flickr30k retrieval as COCO retrieval, OK-VQA as VQAv2.
Visual Genome QA (``vg_vqa``) and GQA differ in one field only (one answer string per question, not a list), so
their writers convert the VQA writer's questions. LAVIS's pretraining datasets (CC3M, CC12M, SBU, VG captions)
have a train split only, written from the train size; ``image_text_shards`` gets the train size's samples in two
tar shards. P-Former's sentence datasets (``laion_sentence_115m``, ``sentences``, ``sentence_shards``) get the
train size's synthetic captions, as text only. Any other dataset has no writer and is refused in one line.
"""
import json
import os

from lavis_accel.datasets import (
    PAIR_DATASETS, write_caption, write_flickr30k_caption, write_image_text_pairs, write_nlvr, write_retrieval,
    write_scene_shards, write_sentence_shards, write_sentences, write_vqa,
)
from lavis_accel.errors import SettingError

# images (NLVR2: image pairs) per split; 8 evaluation examples make a score of exactly 0 unlikely even for a random
# model (LAVIS's runner saves checkpoint_best.pth only for a validation score above 0, and then tests with it)
SIZES = {"n_train": 8, "n_val": 8, "n_test": 8}


def _renamed(writer, name):
    """``writer`` for another dataset that LAVIS reads with the same dataset classes, written under ``name``."""
    def write(root, **sizes):
        (entry,) = writer(os.path.join(root, name), **sizes).values()
        return {name: entry}
    return write


def write_vg_vqa(root, **sizes):
    """Write a ``vg_vqa`` training split (the only split LAVIS's builder has) and return its ``datasets:`` entry.

    LAVIS's ``VGVQADataset`` reads ``image``, ``question`` and one ``answer`` string per entry.
    """
    (entry,) = write_vqa(os.path.join(root, "vg_vqa"), **sizes).values()
    (vqa_train,) = entry["build_info"]["annotations"]["train"]["storage"]
    with open(vqa_train, encoding="utf-8") as f:
        questions = json.load(f)
    path = os.path.join(os.path.dirname(vqa_train), "vg_qa.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump([{**q, "answer": q["answer"][0], "dataset": "vg"} for q in questions], f)
    entry["build_info"]["annotations"] = {"train": {"url": path, "storage": path}}
    return {"vg_vqa": entry}


def write_gqa(root, **sizes):
    """Write a ``gqa`` dataset (train, val, test) and return its ``datasets:`` entry.

    LAVIS's GQA classes read ``image``, ``question``, ``question_id`` and one ``answer`` string per entry; its
    ``gqa`` task scores the answer string by exact match (no official VQA files). The VQA writer's questions are
    converted; a GQA config's ``type`` (e.g. ``balanced_testdev``) only picks other files of the same format.
    """
    (entry,) = write_vqa(os.path.join(root, "gqa"), **sizes).values()
    annotations = {}
    for split, info in entry["build_info"]["annotations"].items():
        questions_file = info["storage"][0]
        with open(questions_file, encoding="utf-8") as f:
            questions = json.load(f)
        path = os.path.join(os.path.dirname(questions_file), f"gqa_{split}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump([{**q, "answer": q["answer"][0]} for q in questions], f)
        annotations[split] = {"url": path, "storage": path}
    entry["build_info"]["annotations"] = annotations
    return {"gqa": entry}


def _pairs(name):
    """The writer of LAVIS pretraining dataset ``name`` (a train split of ``n_train`` images)."""
    def write(root, n_train, **_):
        return write_image_text_pairs(root, name, n=n_train)
    return write


def write_shards(root, n_train, **_):
    """``n_train`` samples in two shards (the tiny run has one rank and no DataLoader workers: one would do)."""
    return write_scene_shards(root, n=n_train, shard_size=max(1, (n_train + 1) // 2))


def _sentences(name):
    """The writer of sentence dataset ``name`` (``n_train`` synthetic captions, a train split only)."""
    def write(root, n_train, **_):
        return write_sentences(root, n=n_train, name=name)
    return write


def write_sentence_shard_files(root, n_train, **_):
    """``n_train`` sentences in two shards, as ``write_shards``."""
    return write_sentence_shards(root, n=n_train, shard_size=max(1, (n_train + 1) // 2))


WRITERS = {
    "coco_retrieval": write_retrieval,
    "flickr30k": _renamed(write_retrieval, "flickr30k"),
    "coco_caption": write_caption,  # its ground truth goes to <root>/coco_gt: root must be the run's cache_root
    "coco_vqa": write_vqa,
    "ok_vqa": _renamed(write_vqa, "ok_vqa"),
    "vg_vqa": write_vg_vqa,
    "gqa": write_gqa,  # LAVIS's gqa task: exact match on one answer string
    "nlvr": write_nlvr,
    "flickr30k_caption": write_flickr30k_caption,  # scored by captioning_own_gt against its own annotations
    "image_text_shards": write_shards,
    "laion_sentence_115m": _sentences("laion_sentence_115m"),  # P-Former stage 0: sentences, no images
    "sentences": _sentences("sentences"),
    "sentence_shards": write_sentence_shard_files,
    **{name: _pairs(name) for name in PAIR_DATASETS},
}


def check_writers(names):
    """Refuse, in one line naming them, the datasets that have no synthetic writer."""
    missing = [name for name in names if name not in WRITERS]
    if missing:
        raise SettingError(f"datasets: no synthetic data for {', '.join(missing)} "
                           f"(dry-run writes {', '.join(sorted(WRITERS))})")


def write_datasets(names, root):
    """Write every dataset in ``names`` under ``root`` at :data:`SIZES`; return the ``datasets:`` entries."""
    check_writers(names)
    entries = {}
    for name in names:
        entries.update(WRITERS[name](root, **SIZES))
    return entries
