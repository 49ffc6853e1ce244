"""DLIP's data: img2dataset tar shards streamed by the ``image_text_shards`` builder (written from synthetic scenes),
LAVIS's pretraining builders fed by the dry-run's writers, and Flickr30k captioning scored against its own ground
truth (``flickr30k_caption`` with the task ``captioning_own_gt``).

The shard reader is checked in this process (layout, decoding, captions from .txt and .json, node and worker shares,
the endless training stream, bad input); training and evaluation go through ``python -m lavis_accel.cli`` as a user
runs them.
"""
import io
import itertools
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import pycocoevalcap.eval as cap_eval
from lavis.common.registry import registry
from lavis.tasks.captioning import coco_caption_eval

from lavis_accel import cli, compat
from lavis_accel.data_checks import check_builder
from lavis_accel.datasets import (
    ImageTextShards, render, scene_samples, shard_share, shard_urls, write_caption,
    write_flickr30k_caption, write_scene_shards,
)
from lavis_accel.datasets.shards import check_share
from lavis_accel.dryrun.data import SIZES, WRITERS
from lavis_accel.errors import SettingError
from lavis_accel.run_checks import check_run
from lavis_accel.tasks.captioning import ground_truth, score_captions
from lavis_accel.testing.projects import tiny_project, write_project
from cli_jobs import job_dir, metrics_lines, run_cli

N_SAMPLES, SHARD_SIZE = 10, 3  # four shards: 3, 3, 3 and 1 samples
LAVIS_PROJECTS = os.path.join(registry.get_path("library_root"), "projects", "blip")
# The DLIP student, tiny, without its teacher: these tests are about the data it streams (image + text_input).
PRETRAIN_MODEL = {"arch": "dlip_pretrain", "model_type": "base"}


def identity(x):
    return x


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    entry = write_scene_shards(tmp_path_factory.mktemp("shards"), n=N_SAMPLES, shard_size=SHARD_SIZE)
    return entry, shard_urls(entry["image_text_shards"]["build_info"]["storage"])


@pytest.fixture
def no_job_config(monkeypatch):
    """Builders used from Python, not inside a job: no run config left in LAVIS's registry by an earlier test."""
    monkeypatch.delitem(registry.mapping["state"], "configuration", raising=False)


def read(urls, **kwargs):
    """Every sample of one pass, the image left as a PIL image and the caption as written."""
    return list(ImageTextShards(urls, identity, identity, passes=1, **kwargs))


def test_shards_have_img2dataset_layout_and_read_back(shards):
    _, urls = shards
    assert [os.path.basename(u) for u in urls] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    with tarfile.open(urls[0]) as tar:
        assert tar.getnames() == [f"00000000{i}.{ext}" for i in range(SHARD_SIZE) for ext in ("jpg", "txt", "json")]
        meta = json.load(tar.extractfile("000000001.json"))
    expected = scene_samples(N_SAMPLES, SHARD_SIZE)
    assert meta["caption"] == expected[1][3] and meta["key"] == "000000001" and meta["status"] == "success"

    samples = read(urls, shuffle=False)
    assert [s["__key__"] for s in samples] == [key for _, key, _, _ in expected]
    assert [s["text_input"] for s in samples] == [caption for _, _, _, caption in expected]
    for sample, (_, _, scene, _) in zip(samples, expected):
        image = sample["image"]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (96, 96)
        difference = np.abs(np.asarray(image, np.float32) - np.asarray(render(scene, 96), np.float32)).mean()
        assert difference < 4  # the scene itself, through JPEG at quality 95


def test_captions_are_read_from_json_when_there_is_no_txt(tmp_path):
    entry = write_scene_shards(tmp_path, n=4, shard_size=2, txt=False)
    urls = shard_urls(entry["image_text_shards"]["build_info"]["storage"])
    with tarfile.open(urls[0]) as tar:
        assert not [name for name in tar.getnames() if name.endswith(".txt")]
    assert [s["text_input"] for s in read(urls, shuffle=False)] == [c for *_, c in scene_samples(4, 2)]


def test_the_builder_yields_processed_samples_and_checks_its_first_sample(shards, no_job_config):
    entry, _ = shards
    builder = registry.get_builder_class("image_text_shards")(OmegaConf.create(entry["image_text_shards"]))
    (split, dataset), = builder.build_datasets().items()
    sample = next(iter(dataset))
    assert split == "train" and isinstance(dataset, ImageTextShards)
    assert sample["image"].shape == (3, 96, 96) and sample["image"].dtype == torch.float32
    assert isinstance(sample["text_input"], str) and sample["text_input"]


def keys_of(urls, shards):
    """The keys of the samples in ``shards`` (a subset of ``urls``), shard by shard in the order given."""
    return [key for url in shards for shard, key, _, _ in scene_samples(N_SAMPLES, SHARD_SIZE) if urls[shard] == url]


@pytest.mark.parametrize("world_size, num_workers", [(1, 1), (2, 1), (2, 2), (3, 1), (4, 1)])
def test_ranks_and_workers_read_disjoint_shares_that_cover_every_sample(shards, monkeypatch, world_size,
                                                                        num_workers):
    _, urls = shards
    readers = list(itertools.product(range(world_size), range(num_workers)))
    for epoch in range(3):  # every pass assigns the shards anew, each shard to one reader
        shares = [shard_share(urls, r, world_size, w, num_workers, seed=7, epoch=epoch) for r, w in readers]
        assert sorted(url for share in shares for url in share) == sorted(urls)
    seen = []
    for rank, worker in readers:
        for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("WORKER", worker),
                            ("NUM_WORKERS", num_workers)):
            monkeypatch.setenv(name, str(value))  # how webdataset learns ranks and workers, as torchrun sets them
        keys = [s["__key__"] for s in ImageTextShards(urls, identity, identity, passes=1, seed=7, shuffle_buffer=4)]
        share = shard_share(urls, rank, world_size, worker, num_workers, seed=7, epoch=0)
        assert sorted(keys) == sorted(keys_of(urls, share))
        seen += keys
    assert sorted(seen) == sorted(key for _, key, _, _ in scene_samples(N_SAMPLES, SHARD_SIZE))


def test_dataloader_workers_split_a_ranks_share(shards, monkeypatch):
    _, urls = shards
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stream = ImageTextShards(urls, identity, identity, passes=1, seed=3)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2,
                                         collate_fn=lambda sample: sample["__key__"])
    keys = list(loader)
    share = shard_share(urls, 1, 2, 0, 1, seed=3, epoch=0)
    assert len(share) == 2 and sorted(keys) == sorted(keys_of(urls, share))


def test_the_training_stream_repeats_pass_after_pass_in_a_new_shard_order(shards):
    _, urls = shards
    stream = iter(ImageTextShards(urls, identity, identity, seed=5, shuffle_buffer=0))  # passes=None: endless
    passes = [[next(stream)["__key__"] for _ in range(N_SAMPLES)] for _ in range(3)]
    for epoch, keys in enumerate(passes):
        assert keys == keys_of(urls, shard_share(urls, 0, 1, 0, 1, seed=5, epoch=epoch))
    assert passes[0] != passes[1] != passes[2]


def test_a_missing_shard_is_one_line_before_any_work(shards, tmp_path, capsys):
    entry, urls = shards
    storage = entry["image_text_shards"]["build_info"]["storage"]
    missing = storage.replace("{00000..00003}", "{00000..00005}")
    with pytest.raises(SettingError) as error:
        registry.get_builder_class("image_text_shards").check_paths("image_text_shards", OmegaConf.create(
            {"build_info": {"storage": missing}}))
    assert str(error.value) == (f"datasets.image_text_shards.build_info.storage: shard "
                                f"{os.path.dirname(urls[0])}/00004.tar does not exist")

    cfg = pretrain_project({"image_text_shards": {**entry["image_text_shards"], "build_info": {"storage": missing}}},
                           tmp_path / "out")
    status = cli.main(["train", "--cfg-path", write_project(cfg, tmp_path / "missing.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1] == f"lavis-accel: error: {error.value}"
    assert not any("Traceback" in line for line in err)
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")  # refused before the job folder


@pytest.mark.parametrize("storage, message", [
    ("", "'' is not a shard path or pattern"),
    ([], "names no shard"),
    (["/data/a.tar", "/data/a.tar"], "shard /data/a.tar is named twice"),
])
def test_an_empty_or_repeated_pattern_is_refused(storage, message):
    with pytest.raises(SettingError, match=f"^datasets.image_text_shards.build_info.storage: {message}"):
        registry.get_builder_class("image_text_shards").check_paths("image_text_shards", OmegaConf.create(
            {"build_info": {"storage": storage}}))


def test_too_few_shards_for_the_readers_is_refused():
    check_share(4, 2, 2)
    with pytest.raises(SettingError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 data loader worker\(s\)"):
        check_share(3, 2, 2)


def test_a_sample_without_a_caption_stops_with_one_line_or_is_skipped(tmp_path):
    entry = write_scene_shards(tmp_path, n=3, shard_size=3, txt=False)
    (url,) = shard_urls(entry["image_text_shards"]["build_info"]["storage"])
    with tarfile.open(url) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(url, "w") as tar:
        for member, data in members:
            if member.name == "000000001.json":
                data = json.dumps({"key": "000000001", "status": "success"}).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(SettingError, match=f"^datasets.image_text_shards: sample 000000001 of shard {url} has no "
                                           "caption"):
        read([url], shuffle=False)
    assert [s["__key__"] for s in read([url], shuffle=False, on_bad_sample="skip")] == ["000000000", "000000002"]


@pytest.mark.parametrize("name", ["flickr30k_caption", "image_text_shards", "conceptual_caption_3m",
                                  "conceptual_caption_12m", "sbu_caption", "vg_caption"])
def test_lavis_builders_read_the_dry_run_writers(name, tmp_path, no_job_config):
    (entry,) = WRITERS[name](str(tmp_path), **SIZES).values()
    builder = registry.get_builder_class(name)(OmegaConf.create(entry))
    check_builder(builder, OmegaConf.create({}), str(tmp_path / "job"), [])  # the plugin's field and image checks
    datasets = builder.build_datasets()
    assert set(datasets) == ({"train", "val", "test"} if name == "flickr30k_caption" else {"train"})
    sample = next(iter(datasets["train"]))
    assert sample["image"].shape == (3, 96, 96) and isinstance(sample["text_input"], str)
    if name != "image_text_shards":
        assert len(datasets["train"]) == SIZES["n_train"] * (5 if name in ("vg_caption", "flickr30k_caption") else 1)


def test_flickr30k_caption_reads_lavis_flickr30k_annotation_files():
    """LAVIS's Flickr30k retrieval files are in coco_caption's format: the caption builder's defaults are them."""
    ours = OmegaConf.load(registry.get_builder_class("flickr30k_caption").default_config_path()).datasets
    lavis = OmegaConf.load(registry.get_builder_class("flickr30k").default_config_path()).datasets
    assert ours.flickr30k_caption.build_info == lavis.flickr30k.build_info


def test_a_split_without_url_needs_its_file(tmp_path, no_job_config):
    (entry,) = write_flickr30k_caption(tmp_path, 2, 2, 2).values()
    entry["build_info"]["annotations"]["val"]["url"] = None
    datasets = registry.get_builder_class("flickr30k_caption")(OmegaConf.create(entry)).build_datasets()
    assert len(datasets["val"]) == 2
    os.remove(entry["build_info"]["annotations"]["val"]["storage"])
    with pytest.raises(SettingError, match=r"^datasets.flickr30k_caption.build_info.annotations.val.storage: .*"
                                           r"val.json does not exist \(and no url"):
        registry.get_builder_class("flickr30k_caption")(OmegaConf.create(entry)).build_datasets()


def eval_dataset(entry, name, split):
    return registry.get_builder_class(name)(OmegaConf.create(entry[name])).build_datasets()[split]


def test_ground_truth_is_the_evaluated_datasets_own_annotations(tmp_path, no_job_config):
    entry = write_flickr30k_caption(tmp_path, 2, 3, 2)
    dataset = eval_dataset(entry, "flickr30k_caption", "test")
    gt = ground_truth("flickr30k_caption", "test", dataset)
    with open(entry["flickr30k_caption"]["build_info"]["annotations"]["test"]["storage"]) as f:
        annotations = json.load(f)
    assert [image["id"] for image in gt["images"]] == [int(dataset[i]["image_id"]) for i in range(len(dataset))]
    assert [a["caption"] for a in gt["annotations"]] == [c for entry_ in annotations for c in entry_["caption"]]
    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])

    dataset.annotation[1]["image"] = f"other/picture_{gt['images'][0]['id']}.jpg"  # another image, the same number
    with pytest.raises(SettingError, match=r"both get image id \d+: their captions would be scored together"):
        ground_truth("flickr30k_caption", "test", dataset)
    dataset.annotation[1]["caption"] = []
    with pytest.raises(SettingError, match=r"^datasets.flickr30k_caption \(test\): entry 1 has no reference"):
        ground_truth("flickr30k_caption", "test", dataset)


def test_own_ground_truth_scores_equal_lavis_scores_against_cocos_files(tmp_path, monkeypatch, no_job_config):
    """On COCO-format data with LAVIS's ground truth files beside it (the synthetic caption writer writes both), the
    dataset's own ground truth gives LAVIS's scores exactly. METEOR (Java) and SPICE are replaced by stand-ins to
    stay fast: they score the same inputs on both sides."""
    class Meteor:
        def compute_score(self, gts, res):
            return 0.5, [0.5] * len(gts)

        def method(self):
            return "METEOR"

    monkeypatch.setattr(cap_eval, "Meteor", Meteor)
    monkeypatch.setattr(cap_eval, "Spice", compat._SpiceUnavailable)
    entry = write_caption(tmp_path, 2, 6, 2)
    gt = ground_truth("coco_caption", "val", eval_dataset(entry, "coco_caption", "val"))
    results = [{"image_id": image["id"], "caption": caption} for image, caption in
               zip(gt["images"], ["a red circle", "two shapes on the left", "a blue square at the top", "a circle",
                                  "an image showing a green triangle", "a yellow diamond in the center"])]
    for name, data in (("results.json", results), ("gt.json", gt)):
        with open(tmp_path / name, "w") as f:
            json.dump(data, f)
    lavis = coco_caption_eval(str(tmp_path / "coco_gt"), str(tmp_path / "results.json"), "val").eval
    ours = score_captions(str(tmp_path / "gt.json"), str(tmp_path / "results.json")).eval
    assert set(ours) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert ours == pytest.approx(lavis) and 0 < ours["CIDEr"] and 0 < ours["Bleu_1"] < 1


def pretrain_project(datasets, output_dir, **run):
    """A tiny pretraining project on ``datasets`` with LAVIS's iteration-based runner (as its LAION configs)."""
    project = {
        "model": PRETRAIN_MODEL,
        "datasets": {name: {} for name in datasets},
        "run": {"task": "image_text_pretrain", "runner": "runner_iter", "max_iters": 4, "iters_per_inner_epoch": 2,
                "lr_sched": "linear_warmup_cosine_lr", "init_lr": 1e-4, "min_lr": 1e-6, "warmup_lr": 1e-6,
                "warmup_steps": 1, "weight_decay": 0.05, "batch_size_train": 4, "batch_size_eval": 4, "seed": 42,
                "train_splits": ["train"], "evaluate": False, **run},
    }
    return tiny_project(project, datasets, output_dir, model={"teacher": None})


def test_flickr30k_captioning_is_scored_against_its_own_ground_truth(tmp_path):
    datasets = write_flickr30k_caption(tmp_path / "data", 16, 8, 8)
    project = OmegaConf.load(os.path.join(LAVIS_PROJECTS, "train", "caption_coco_ft.yaml"))
    project.datasets = {"flickr30k_caption": project.datasets.coco_caption}
    project.run.task = "captioning_own_gt"
    cfg = tiny_project(project, datasets, tmp_path / "out", run={
        "max_epoch": 1, "batch_size_train": 8, "batch_size_eval": 8, "warmup_steps": 1, "max_len": 8, "min_len": 2,
        "valid_splits": [], "test_splits": ["test"]})
    run_cli("train", "--cfg-path", write_project(cfg, tmp_path / "train.yaml"), timeout=300)
    directory = job_dir(tmp_path / "out")
    (test_metrics,) = [line["test"] for line in metrics_lines(directory)]
    assert {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(test_metrics)
    with open(os.path.join(directory, "result", "test_gt.json")) as f:
        gt = json.load(f)
    with open(datasets["flickr30k_caption"]["build_info"]["annotations"]["test"]["storage"]) as f:
        annotations = json.load(f)
    assert [a["caption"] for a in gt["annotations"]] == [c for entry in annotations for c in entry["caption"]]
    with open(os.path.join(directory, "result", "test_epoch0.json")) as f:
        results = json.load(f)
    assert sorted(r["image_id"] for r in results) == sorted(image["id"] for image in gt["images"])


def test_lavis_captioning_task_is_refused_for_flickr30k_before_work(tmp_path, capsys):
    datasets = write_flickr30k_caption(tmp_path / "data", 2, 2, 2)
    project = OmegaConf.load(os.path.join(LAVIS_PROJECTS, "train", "caption_coco_ft.yaml"))
    project.datasets = {"flickr30k_caption": project.datasets.coco_caption}
    cfg = tiny_project(project, datasets, tmp_path / "out", run={"max_epoch": 1})
    status = cli.main(["train", "--cfg-path", write_project(cfg, tmp_path / "train.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1] == ("lavis-accel: error: run.task captioning scores flickr30k_caption against "
                                       "COCO's ground truth (cache_root/coco_gt): use run.task captioning_own_gt, "
                                       "which scores against the dataset's own captions")


def test_a_dlip_pretraining_mix_yaml_can_be_dry_run(tmp_path, capsys, monkeypatch):
    """DLIP's mix (COCO, CC3M, SBU, VG captions and a shard stream) as a cluster yaml, rehearsed on CPU."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cluster = {
        "model": {**PRETRAIN_MODEL, "teacher": None},
        "datasets": {"coco_caption": {}, "conceptual_caption_3m": {}, "sbu_caption": {}, "vg_caption": {},
                     "image_text_shards": {"build_info": {"storage": "/cluster/cc3m/{00000..00331}.tar"}}},
        "run": {"task": "image_text_pretrain", "runner": "runner_iter", "max_iters": 2e4,
                "iters_per_inner_epoch": 2e3, "lr_sched": "linear_warmup_cosine_lr", "init_lr": 5e-4,
                "min_lr": 1e-6, "warmup_lr": 1e-6, "warmup_steps": 3000, "weight_decay": 0.02,
                "batch_size_train": 288, "batch_size_eval": 64, "num_workers": 8, "seed": 42,
                "output_dir": "output/DLIP/pretrain", "amp": True, "train_splits": ["train"], "evaluate": False,
                "device": "cuda", "world_size": 4, "dist_url": "env://", "distributed": True},
    }
    status = cli.main(["dry-run", "--cfg-path", write_project(OmegaConf.create(cluster), tmp_path / "dlip.yaml")])
    out = capsys.readouterr().out
    assert status == 0, out
    rows = {line.split()[0]: line.strip().split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert rows["data"].startswith("synthetic coco_caption, conceptual_caption_3m, sbu_caption, vg_caption, "
                                   "image_text_shards")
    assert rows["training"].startswith("1 epoch, 5 steps, train_loss")


def test_streamed_data_needs_the_iteration_based_runner(shards, tmp_path, capsys):
    entry, _ = shards
    cfg = pretrain_project(entry, tmp_path / "out", runner="runner_base", max_epoch=1)
    status = cli.main(["train", "--cfg-path", write_project(cfg, tmp_path / "base.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1] == ("lavis-accel: error: datasets.image_text_shards is streamed, without a "
                                       "length: train it with run.runner: runner_iter (and run.max_iters, "
                                       "run.iters_per_inner_epoch), not runner_base")


@pytest.mark.parametrize("max_iters, accepted", [(2e4, True), (4, True), (0, False), (2.5, False), ("2e4", False)])
def test_runner_iter_needs_whole_iteration_counts(shards, tmp_path, max_iters, accepted):
    """LAVIS reads them with ``int()`` (its own yamls write ``max_iters: 2e4``) and asserts they are positive."""
    import lavis.common.optims  # noqa: F401  (registers the lr schedules check_run knows)

    entry, _ = shards
    cfg = pretrain_project(entry, tmp_path / "out", max_iters=max_iters)
    if accepted:
        check_run(cfg, "train")
    else:
        with pytest.raises(SettingError, match=r"^run.max_iters must be a whole number of at least 1 for run.runner "
                                               r"runner_iter, not "):
            check_run(cfg, "train")
