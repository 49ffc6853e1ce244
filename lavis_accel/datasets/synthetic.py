"""Synthetic datasets in LAVIS's own annotation formats, read by LAVIS's own builders, datasets and tasks unchanged.

Each writer draws seeded scenes (``scenes.py``), saves them as JPEG files, writes the annotation files LAVIS's
builder for that dataset reads, and returns the ``datasets:`` entry of a LAVIS project config that points the
builder at them (absolute ``storage`` paths; ``url`` set to the same local file, which LAVIS's downloader uses
in place). Everything goes under ``<root>/<dataset name>/``; the caption writer also writes the ground truth
that LAVIS's captioning task scores against, under ``<root>/coco_gt/``, where the task looks for it when ``root``
is LAVIS's ``cache_root`` (see ``set_cache_root``).

Images are processed by ``blip_image_eval`` for training too: positions are named from the viewer's side, and
the random crop and horizontal flip of ``blip_image_train`` would make captions false.
"""
import json
import os
import random

from omegaconf import OmegaConf

from lavis.common.registry import registry
from lavis_accel.datasets.language import CAPTION_PROMPT, answer_list, captions, pick_statement, questions
from lavis_accel.datasets.scenes import MIN_IMAGE_SIZE, generate_scenes, render

SPLITS = ("train", "val", "test")
VQA_QUESTIONS_PER_IMAGE = 3
_JPEG_QUALITY = 95


def set_cache_root(path):
    """Point LAVIS's ``cache_root`` at ``path`` and return the previous value.

    LAVIS reads the caption ground truth from ``<cache_root>/coco_gt/coco_karpathy_{val,test}_gt.json`` and
    resolves relative ``storage`` paths against ``cache_root``, which it sets once, at import, from its packaged
    ``configs/default.yaml``; a project config cannot change it. Call this with the ``root`` given to
    ``write_caption`` before a captioning run evaluates.
    """
    previous = registry.get_path("cache_root")
    registry.mapping["paths"]["cache_root"] = os.path.abspath(path)
    return previous


def _check_settings(sizes, image_size):
    for split, n in sizes.items():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n_{split} must be a positive integer, got {n!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer of at least {MIN_IMAGE_SIZE} pixels, got {image_size!r}")


def _scenes_by_split(sizes, seed):
    """``{split: [(image_id, scene)]}`` with image ids 1, 2, ... running on across the splits."""
    scenes = iter(generate_scenes(sum(sizes.values()), seed))
    image_id, by_split = 0, {}
    for split, n in sizes.items():
        by_split[split] = []
        for _ in range(n):
            image_id += 1
            by_split[split].append((image_id, next(scenes)))
    return by_split


def _save_image(scene, image_dir, relative_path, image_size):
    path = os.path.join(image_dir, relative_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    render(scene, image_size).save(path, quality=_JPEG_QUALITY)


def _image_name(split, image_id):
    # LAVIS's COCO caption eval set reads the image id from the digits after the last "_" of the file name.
    return f"{split}/synthetic_{image_id:06d}.jpg"


def _write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def _local(paths):
    """One split's ``annotations`` entry: LAVIS's downloader keeps a local ``url`` equal to ``storage`` as it is."""
    return {"url": paths, "storage": paths}


def _dataset_entry(name, annotations, image_dir, image_size, text_processor, train_text_extra=None):
    image_processor = {"name": "blip_image_eval", "image_size": image_size}
    return {name: {
        "data_type": "images",
        "build_info": {"annotations": annotations, "images": {"storage": image_dir}},
        "vis_processor": {"train": dict(image_processor), "eval": dict(image_processor)},
        "text_processor": {"train": {"name": text_processor, **(train_text_extra or {})},
                           "eval": {"name": text_processor}},
    }}


def _write_karpathy(dataset_dir, by_split, image_size, file_name="coco_karpathy_{split}.json"):
    """Images and ``coco_karpathy_{split}.json`` (``file_name``): one (caption, image) pair per entry for train, one
    image with its list of captions per entry for val and test, as in LAVIS's COCO (and Flickr30k) files."""
    image_dir = os.path.join(dataset_dir, "images")
    files = {}
    for split, items in by_split.items():
        entries = []
        for image_id, scene in items:
            name = _image_name(split, image_id)
            _save_image(scene, image_dir, name, image_size)
            if split == "train":
                entries += [{"caption": c, "image": name, "image_id": f"synthetic_{image_id}"} for c in captions(scene)]
            else:
                entries.append({"image": name, "caption": captions(scene)})
        path = os.path.join(dataset_dir, "annotations", file_name.format(split=split))
        files[split] = _local(_write_json(path, entries))
    return files, image_dir


def write_retrieval(root, n_train=200, n_val=50, n_test=50, image_size=96, seed=0):
    """Write a ``coco_retrieval`` dataset under ``<root>/coco_retrieval`` and return its ``datasets:`` entry."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    _check_settings(sizes, image_size)
    dataset_dir = os.path.join(os.path.abspath(root), "coco_retrieval")
    files, image_dir = _write_karpathy(dataset_dir, _scenes_by_split(sizes, seed), image_size)
    return _dataset_entry("coco_retrieval", files, image_dir, image_size, "blip_caption")


def caption_ground_truth(items):
    """The COCO-format ground truth LAVIS's captioning task scores a split against (``coco_karpathy_*_gt.json``)."""
    images = [{"id": image_id} for image_id, _ in items]
    annotations = [{"image_id": image_id, "caption": caption}
                   for image_id, scene in items for caption in captions(scene)]
    for ann_id, ann in enumerate(annotations):
        ann["id"] = ann_id
    return {"info": {"description": "lavis_accel synthetic scenes"}, "images": images, "annotations": annotations}


def write_caption(root, n_train=200, n_val=50, n_test=50, image_size=96, seed=0, prompt=CAPTION_PROMPT):
    """Write a ``coco_caption`` dataset under ``<root>/coco_caption`` and its evaluation ground truth under
    ``<root>/coco_gt``; return its ``datasets:`` entry. ``prompt`` is prepended to training captions by the text
    processor, as LAVIS's BLIP captioning configs do. Call ``set_cache_root(root)`` before evaluating."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    _check_settings(sizes, image_size)
    root = os.path.abspath(root)
    dataset_dir = os.path.join(root, "coco_caption")
    by_split = _scenes_by_split(sizes, seed)
    files, image_dir = _write_karpathy(dataset_dir, by_split, image_size)
    for split in ("val", "test"):
        _write_json(os.path.join(root, "coco_gt", f"coco_karpathy_{split}_gt.json"),
                    caption_ground_truth(by_split[split]))
    return _dataset_entry("coco_caption", files, image_dir, image_size, "blip_caption", {"prompt": prompt})


def write_flickr30k_caption(root, n_train=200, n_val=50, n_test=50, image_size=96, seed=0, prompt=CAPTION_PROMPT):
    """Write a ``flickr30k_caption`` dataset under ``<root>/flickr30k_caption`` (``train.json``, ``val.json``,
    ``test.json``, the file names of LAVIS's Flickr30k) and return its ``datasets:`` entry. No ground truth file:
    the task ``captioning_own_gt`` scores against the annotations themselves."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    _check_settings(sizes, image_size)
    dataset_dir = os.path.join(os.path.abspath(root), "flickr30k_caption")
    files, image_dir = _write_karpathy(dataset_dir, _scenes_by_split(sizes, seed), image_size, "{split}.json")
    return _dataset_entry("flickr30k_caption", files, image_dir, image_size, "blip_caption", {"prompt": prompt})


def _vqa_official_files(directory, split, records):
    """The question and annotation files of the official VQA evaluation (``VQA``/``VQAEval`` in LAVIS)."""
    header = {"info": {"description": "lavis_accel synthetic scenes"}, "license": {}, "data_type": "synthetic",
              "data_subtype": split}
    question_file = {**header, "task_type": "Open-Ended", "questions": [
        {"image_id": image_id, "question": q.text, "question_id": qid} for qid, image_id, q in records]}
    annotation_file = {**header, "annotations": [{
        "question_id": qid, "image_id": image_id, "question_type": q.question_type, "answer_type": q.answer_type,
        "multiple_choice_answer": q.answer,
        # Ten answers with distinct ids, as in VQA v2: VQAEval scores an answer against the other nine.
        "answers": [{"answer": q.answer, "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)],
    } for qid, image_id, q in records]}
    return [_write_json(os.path.join(directory, f"v2_OpenEnded_synthetic_{split}_questions.json"), question_file),
            _write_json(os.path.join(directory, f"v2_synthetic_{split}_annotations.json"), annotation_file)]


def write_vqa(root, n_train=200, n_val=50, n_test=50, image_size=96, seed=0,
              questions_per_image=VQA_QUESTIONS_PER_IMAGE):
    """Write a ``coco_vqa`` dataset under ``<root>/coco_vqa`` and return its ``datasets:`` entry.

    ``n_*`` count images; each gets ``questions_per_image`` questions. Val and test both get the answer list and
    the official question/annotation files, so LAVIS's VQA task scores either split.
    """
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    _check_settings(sizes, image_size)
    if not isinstance(questions_per_image, int) or questions_per_image < 1:
        raise ValueError(f"questions_per_image must be a positive integer, got {questions_per_image!r}")
    dataset_dir = os.path.join(os.path.abspath(root), "coco_vqa")
    image_dir = os.path.join(dataset_dir, "images")
    ann_dir = os.path.join(dataset_dir, "annotations")
    rng = random.Random(f"vqa:{seed}")
    answer_list_file = _write_json(os.path.join(ann_dir, "answer_list.json"), answer_list())
    files = {}
    for split, items in _scenes_by_split(sizes, seed).items():
        entries, records = [], []
        for image_id, scene in items:
            name = _image_name(split, image_id)
            _save_image(scene, image_dir, name, image_size)
            candidates = questions(scene, rng)
            chosen = rng.sample(candidates, min(questions_per_image, len(candidates)))
            for k, q in enumerate(chosen):
                qid = image_id * 100 + k
                records.append((qid, image_id, q))
                entries.append({"question_id": qid, "question": q.text, "answer": [q.answer], "image": name,
                                "dataset": "vqa"})
        if split == "train":
            files[split] = _local([_write_json(os.path.join(ann_dir, "vqa_train.json"), entries)])
        else:
            main_file = _write_json(os.path.join(ann_dir, f"vqa_{split}_eval.json"), entries)
            files[split] = _local([main_file, answer_list_file] + _vqa_official_files(ann_dir, split, records))
    return _dataset_entry("coco_vqa", files, image_dir, image_size, "blip_question")


def write_nlvr(root, n_train=200, n_val=50, n_test=50, image_size=96, seed=0):
    """Write an ``nlvr`` dataset under ``<root>/nlvr`` and return its ``datasets:`` entry.

    ``n_*`` count examples: two images (drawn fresh for each example) and one statement, true or false with equal
    chance, labelled ``"True"``/``"False"`` as in LAVIS's NLVR2 files.
    """
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    _check_settings(sizes, image_size)
    dataset_dir = os.path.join(os.path.abspath(root), "nlvr")
    image_dir = os.path.join(dataset_dir, "images")
    rng = random.Random(f"nlvr:{seed}")
    scenes = iter(generate_scenes(2 * sum(sizes.values()), seed))
    files = {}
    for split, n in sizes.items():
        entries = []
        for index in range(n):
            left, right = next(scenes), next(scenes)
            names = [f"{split}/pair_{index:06d}_img{side}.jpg" for side in (0, 1)]
            for scene, name in zip((left, right), names):
                _save_image(scene, image_dir, name, image_size)
            sentence, truth = pick_statement(left, right, rng)
            entries.append({"images": names, "sentence": sentence, "label": str(truth)})
        file_name = {"train": "train.json", "val": "dev.json", "test": "test.json"}[split]
        files[split] = _local(_write_json(os.path.join(dataset_dir, "annotations", file_name), entries))
    return _dataset_entry("nlvr", files, image_dir, image_size, "blip_caption")


def write_all(root, n_train=200, n_val=50, n_test=50, image_size=96, seed=0):
    """Write all four datasets under ``root`` and ``<root>/datasets.yaml`` (their ``datasets:`` section).

    Returns the merged ``datasets:`` dict. For captioning evaluation, call ``set_cache_root(root)``.
    """
    sizes = dict(n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed)
    datasets = {}
    for writer in (write_retrieval, write_caption, write_vqa, write_nlvr):
        datasets.update(writer(root, **sizes))
    OmegaConf.save(OmegaConf.create({"datasets": datasets}), os.path.join(os.path.abspath(root), "datasets.yaml"))
    return datasets
