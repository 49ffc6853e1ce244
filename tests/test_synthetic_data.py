"""The synthetic datasets load through LAVIS's own config merge, builders, datasets and evaluation code, unchanged."""
import json
import os
import re
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from PIL import Image

import lavis_accel  # noqa: F401  (torchvision fix before LAVIS)
import lavis.tasks.captioning as captioning
from lavis.common.config import Config
from lavis.common.registry import registry
from lavis.common.vqa_tools.vqa import VQA
from lavis.tasks.vqa import VQATask
from pycocotools.coco import COCO

from lavis_accel.datasets import (
    COLORS, KINDS, PLACES, POSITIONS, answer_list, captions, corpus, generate_scenes, render, set_cache_root,
    statements, write_all, write_caption, write_nlvr, write_retrieval, write_vqa,
)

PLACE_NAMES = {phrase: position for position, phrase in PLACES.items()}
SIZES = dict(n_train=4, n_val=3, n_test=2, image_size=48, seed=7)
N_IMAGES = SIZES["n_train"] + SIZES["n_val"] + SIZES["n_test"]


@pytest.fixture
def registry_paths():
    """Restore LAVIS's registered paths (cache_root, output_dir) after a test that changes them."""
    saved = dict(registry.mapping["paths"])
    yield registry.mapping["paths"]
    registry.mapping["paths"].clear()
    registry.mapping["paths"].update(saved)


def build(datasets_cfg):
    """Merge the entry over LAVIS's default dataset yaml, as a LAVIS run does, and build it with LAVIS's builder."""
    (name,) = datasets_cfg
    merged = Config.build_dataset_config(OmegaConf.create({"datasets": datasets_cfg}))
    return registry.get_builder_class(name)(merged.datasets[name]).build_datasets(), merged


def assert_drawn(image_path, scene):
    """Each shape's colour is at its centre in the saved picture (JPEG, so within a tolerance)."""
    image = Image.open(image_path).convert("RGB")
    for shape in scene.shapes:
        x, y, _ = shape.geometry(image.width)
        pixel = image.getpixel((int(x), int(y)))
        assert max(abs(p - c) for p, c in zip(pixel, COLORS[shape.color])) < 40, (image_path, shape)


def test_scenes_are_seeded_and_distinct():
    scenes = generate_scenes(300, seed=3)
    assert scenes == generate_scenes(300, seed=3)
    assert scenes != generate_scenes(300, seed=4)
    assert len({s.signature() for s in scenes}) == 300
    assert {len(s.shapes) for s in scenes} == {1, 2, 3}
    for scene in scenes:
        assert len({s.color for s in scene.shapes}) == len({s.kind for s in scene.shapes}) == len(scene.shapes)


def test_render_draws_each_shape_in_its_colour_inside_its_cell(tmp_path):
    for index, scene in enumerate(generate_scenes(20, seed=1)):
        path = tmp_path / f"{index}.png"
        render(scene, 96).save(path)
        assert_drawn(path, scene)
        for shape in scene.shapes:
            x, y, r = shape.geometry(96)
            row, column = divmod(POSITIONS.index(shape.position), 3)
            assert column * 32 <= x - r and x + r <= (column + 1) * 32
            assert row * 32 <= y - r and y + r <= (row + 1) * 32


def test_captions_name_each_shape_with_its_colour_and_place_and_nothing_else():
    for scene in generate_scenes(100, seed=5):
        for caption in captions(scene):
            for shape in scene.shapes:
                thing, place = f"{shape.color} {shape.kind}", PLACES[shape.position]
                assert f"{thing} {place}" in caption or re.search(f"{place} an? {thing}", caption), caption
            named = [w for w in _words(caption) if w in COLORS or w in KINDS]
            assert len(named) == 2 * len(scene.shapes), caption


def test_retrieval_builds_with_lavis_and_matches_the_scenes(tmp_path):
    datasets, merged = build(write_retrieval(tmp_path, **SIZES))
    assert merged.datasets.coco_retrieval.build_info.annotations.train.storage.startswith(str(tmp_path))
    train, val, test = datasets["train"], datasets["val"], datasets["test"]
    assert (len(train), len(val), len(test)) == (5 * SIZES["n_train"], SIZES["n_val"], SIZES["n_test"])
    item = train[0]
    assert set(item) == {"image", "text_input", "image_id", "instance_id"}
    assert item["image"].shape == (3, 48, 48) and isinstance(item["text_input"], str)
    assert len(val.text) == 5 * SIZES["n_val"] and val.txt2img[5] == 1 and val[1]["image"].shape == (3, 48, 48)

    scenes = generate_scenes(N_IMAGES, SIZES["seed"])
    assert [a["caption"] for a in train.annotation[:5]] == captions(scenes[0])
    for index, ann in enumerate(test.annotation):
        scene = scenes[SIZES["n_train"] + SIZES["n_val"] + index]
        assert ann["caption"] == captions(scene)
        assert_drawn(os.path.join(test.vis_root, ann["image"]), scene)


class RecordingScorer:
    """Stands in for pycocoevalcap's COCOEvalCap (whose SPICE needs a download) and records what LAVIS gave it."""

    def __init__(self, ground_truth, result):
        self.ground_truth, self.result, self.evaluated, self.eval = ground_truth, result, False, {}

    def evaluate(self):
        self.evaluated = True


def test_caption_builds_and_lavis_scores_against_the_ground_truth(tmp_path, registry_paths, monkeypatch):
    datasets, _ = build(write_caption(tmp_path, **SIZES))
    train, val = datasets["train"], datasets["val"]
    assert train[0]["text_input"] == "a picture of " + captions(generate_scenes(1, SIZES["seed"])[0])[0]
    assert set(val[0]) == {"image", "image_id", "instance_id"}

    ground_truth = COCO(os.path.join(tmp_path, "coco_gt", "coco_karpathy_val_gt.json"))
    val_ids = [int(val[i]["image_id"]) for i in range(len(val))]  # what LAVIS's caption task reports
    assert sorted(ground_truth.getImgIds()) == sorted(val_ids)
    scenes = generate_scenes(N_IMAGES, SIZES["seed"])
    assert [a["caption"] for a in ground_truth.imgToAnns[val_ids[0]]] == captions(scenes[val_ids[0] - 1])

    # LAVIS's own caption evaluation finds the file through cache_root (no download), scorer stubbed out.
    set_cache_root(tmp_path)
    results = tmp_path / "val_results.json"
    results.write_text(json.dumps([{"image_id": i, "caption": "a red circle"} for i in val_ids]))
    monkeypatch.setattr(captioning, "COCOEvalCap", RecordingScorer)
    scorer = captioning.coco_caption_eval(
        os.path.join(registry.get_path("cache_root"), "coco_gt"), str(results), "val")
    assert scorer.evaluated and sorted(scorer.result.getImgIds()) == sorted(val_ids)
    assert len(scorer.ground_truth.getAnnIds()) == 5 * SIZES["n_val"]


def test_set_cache_root_returns_the_previous_root(tmp_path, registry_paths):
    before = registry.get_path("cache_root")
    assert set_cache_root(tmp_path) == before
    assert registry.get_path("cache_root") == str(tmp_path)


def test_vqa_builds_and_lavis_vqa_task_scores_it(tmp_path, registry_paths):
    datasets_cfg = write_vqa(tmp_path, **SIZES)
    _, merged = build(datasets_cfg)
    task = VQATask(num_beams=1, max_len=5, min_len=1, evaluate=True, num_ans_candidates=8)
    datasets = task.build_datasets(SimpleNamespace(datasets_cfg=merged.datasets))["coco_vqa"]
    train, val = datasets["train"], datasets["val"]
    assert len(train) == 3 * SIZES["n_train"] and len(val) == 3 * SIZES["n_val"]
    item = train[0]
    assert set(item) == {"image", "text_input", "answers", "weights"} and item["weights"] == [1.0]
    batch = train.collater([train[0], train[1]])
    assert batch["image"].shape == (2, 3, 48, 48) and batch["n_answers"].tolist() == [1, 1]
    assert val.answer_list == answer_list() and isinstance(val[0]["question_id"], int)
    assert set(task.ques_files) == {"val", "test"}

    # The official VQA evaluation, as LAVIS runs it: right answers score 100, wrong ones 0.
    registry_paths["output_dir"] = str(tmp_path)
    truth = {a["question_id"]: a["multiple_choice_answer"]
             for a in json.load(open(task.anno_files["val"]))["annotations"]}
    assert set(truth) == {a["question_id"] for a in val.annotation}
    for answers, expected in ((truth, 100.0), ({q: "purple elephant" for q in truth}, 0.0)):
        result = tmp_path / "val_vqa_result.json"
        result.write_text(json.dumps([{"question_id": q, "answer": a} for q, a in answers.items()]))
        assert task._report_metrics(result_file=str(result), split="val")["agg_metrics"] == expected


def test_vqa_answers_are_true_of_the_scene(tmp_path):
    sizes = dict(SIZES, n_test=20)
    write_vqa(tmp_path, **sizes, questions_per_image=30)  # more than there are: every question asked
    anno = VQA(os.path.join(tmp_path, "coco_vqa/annotations/v2_synthetic_test_annotations.json"),
               os.path.join(tmp_path, "coco_vqa/annotations/v2_OpenEnded_synthetic_test_questions.json"))
    scenes = generate_scenes(sum(sizes[f"n_{split}"] for split in ("train", "val", "test")), SIZES["seed"])
    assert len(anno.qa) > 20 * 7
    for qid, ann in anno.qa.items():
        scene, question = scenes[ann["image_id"] - 1], anno.qqa[qid]["question"]
        answer = ann["multiple_choice_answer"]
        if question.startswith("what color is the "):
            assert (answer, question[18:-1]) in {(s.color, s.kind) for s in scene.shapes}
        elif question.startswith("how many"):
            assert answer == str(len(scene.shapes))
        elif question.startswith("where is the "):
            assert tuple(question[13:-1].split(" ")) + (answer,) in scene.signature()
        elif question.startswith("what shape is "):
            assert (answer, PLACE_NAMES[question[14:-1]]) in {(s.kind, s.position) for s in scene.shapes}
        elif question.startswith("is there "):
            color, kind = question[:-1].split(" ")[-2:]
            assert answer == ("yes" if color in {s.color for s in scene.shapes if s.kind == kind} else "no")
        assert answer in answer_list()


def judge(sentence, left, right):
    """Whether an NLVR2 statement is true of the two scenes, worked out here independently of the generator."""
    images = {"left": left, "right": right}
    things = {side: {(s.color, s.kind) for s in scene.shapes} for side, scene in images.items()}
    has_kind = {side: {k for _, k in pairs} for side, pairs in things.items()}
    has_color = {side: {c for c, _ in pairs} for side, pairs in things.items()}
    if match := re.fullmatch(r"the (left|right) image contains an? (\w+) (\w+)", sentence):
        return (match[2], match[3]) in things[match[1]]
    if match := re.fullmatch(r"both images contain an? (\w+) shape", sentence):
        return all(match[1] in colors for colors in has_color.values())
    if match := re.fullmatch(r"both images contain an? (\w+)", sentence):
        return all(match[1] in kinds for kinds in has_kind.values())
    if match := re.fullmatch(r"exactly one image contains an? (\w+)", sentence):
        return sum(match[1] in kinds for kinds in has_kind.values()) == 1
    if match := re.fullmatch(r"the (left|right) image has more shapes than the (left|right) image", sentence):
        return len(images[match[1]].shapes) > len(images[match[2]].shapes)
    if match := re.fullmatch(r"there are (\w+) shapes in total", sentence):
        return ["two", "three", "four", "five", "six"].index(match[1]) + 2 == len(left.shapes) + len(right.shapes)
    raise AssertionError(f"unexpected statement: {sentence}")


def test_nlvr_builds_and_labels_are_true_of_the_scenes(tmp_path):
    datasets, _ = build(write_nlvr(tmp_path, **SIZES))
    train, val, test = datasets["train"], datasets["val"], datasets["test"]
    assert (len(train), len(val), len(test)) == (SIZES["n_train"], SIZES["n_val"], SIZES["n_test"])
    item = val[0]
    assert set(item) == {"image0", "image1", "text_input", "label", "instance_id"}
    assert item["image0"].shape == item["image1"].shape == (3, 48, 48) and item["label"] in (0, 1)

    scenes = iter(generate_scenes(2 * N_IMAGES, SIZES["seed"]))
    for dataset in (train, val, test):
        for ann in dataset.annotation:
            left, right = next(scenes), next(scenes)
            assert ann["label"] == str(judge(ann["sentence"], left, right))
            assert_drawn(os.path.join(dataset.vis_root, ann["images"][0]), left)


def test_every_nlvr_statement_has_the_right_truth():
    scenes = generate_scenes(40, seed=2)
    for left, right in zip(scenes[::2], scenes[1::2]):
        for family in statements(left, right):
            for sentence, is_true in family:
                assert is_true == judge(sentence, left, right), sentence


def test_nlvr_labels_are_balanced_and_never_name_positions_inside_an_image(tmp_path):
    write_nlvr(tmp_path, n_train=200, n_val=1, n_test=1, image_size=36)
    entries = json.load(open(tmp_path / "nlvr/annotations/train.json"))
    assert 70 <= sum(e["label"] == "True" for e in entries) <= 130
    for entry in entries:
        for side in ("left", "right"):
            assert entry["sentence"].count(side) == entry["sentence"].count(f"{side} image")


def _words(text):
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _texts(data):
    """Every caption, question, statement and answer in a loaded annotation file."""
    if isinstance(data, list):
        for value in data:
            yield from _texts(value)
    elif isinstance(data, dict):
        for key, value in data.items():
            if key in ("caption", "question", "sentence", "answer", "multiple_choice_answer"):
                yield from [value] if isinstance(value, str) else value
            elif isinstance(value, (list, dict)):
                yield from _texts(value)


def test_corpus_covers_every_word_written(tmp_path):
    write_all(tmp_path, n_train=30, n_val=5, n_test=5, image_size=36, seed=11)
    vocabulary = set().union(*map(_words, corpus()))
    written = set().union(*map(_words, answer_list()))
    for directory, _, files in os.walk(tmp_path):
        for name in files:
            if name.endswith(".json") and name != "answer_list.json":
                with open(os.path.join(directory, name)) as f:
                    written |= set().union(*map(_words, _texts(json.load(f))))
    assert len(written) > 40 and written <= vocabulary, sorted(written - vocabulary)


def test_write_all_writes_the_datasets_yaml_it_returns(tmp_path):
    datasets = write_all(tmp_path, n_train=2, n_val=1, n_test=1, image_size=36)
    assert list(datasets) == ["coco_retrieval", "coco_caption", "coco_vqa", "nlvr"]
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "datasets.yaml")) == {"datasets": datasets}
    for entry in datasets.values():
        assert entry["vis_processor"]["train"] == {"name": "blip_image_eval", "image_size": 36}


def test_writers_are_deterministic(tmp_path):
    for run in ("a", "b"):
        write_vqa(tmp_path / run, **SIZES)
    for name in ("vqa_train.json", "vqa_val_eval.json", "v2_synthetic_test_annotations.json"):
        assert (tmp_path / "a/coco_vqa/annotations" / name).read_text() == (
            tmp_path / "b/coco_vqa/annotations" / name).read_text()
    image = "coco_vqa/images/val/synthetic_000005.jpg"
    assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()


@pytest.mark.parametrize("bad, message", [
    (dict(n_train=0), "n_train must be a positive integer"),
    (dict(n_val=2.5), "n_val must be a positive integer"),
    (dict(image_size=20), "image_size must be an integer of at least 36"),
])
def test_bad_settings_fail_with_one_line(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        write_retrieval(tmp_path, **{**SIZES, **bad})
    assert not os.path.exists(tmp_path / "coco_retrieval")
