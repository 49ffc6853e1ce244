"""Bad input through the CLI: one line naming the setting or file, exit status 2, before any model is built or any
step is taken; never a traceback, never a silently wrong run. Cases from the reliability issue, each on a tiny
BLIP retrieval project over synthetic data in LAVIS's own formats."""
import json
import os
import shutil
import struct
import zlib

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_accel import cli
from lavis_accel.datasets import write_retrieval
from lavis_accel.testing.projects import tiny_project, write_project
from test_checkpoints import _Hostile

LAVIS_PROJECTS = os.path.join(registry.get_path("library_root"), "projects", "blip")
TRAIN_YAML = os.path.join(LAVIS_PROJECTS, "train", "retrieval_coco_ft.yaml")
EVAL_YAML = os.path.join(LAVIS_PROJECTS, "eval", "ret_coco_eval.yaml")
TINY_RUN = {"max_epoch": 1, "batch_size_train": 4, "batch_size_eval": 4, "warmup_steps": 1, "k_test": 2,
            "valid_splits": ["val"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, write_retrieval(root, n_train=8, n_val=4, n_test=4)


def _copy_dataset(data, tmp_path):
    """A private copy of the synthetic dataset (annotations and images) that a test may damage."""
    root, datasets = data
    target = tmp_path / "data"
    shutil.copytree(root / "coco_retrieval", target / "coco_retrieval")
    entry = OmegaConf.to_container(OmegaConf.create(datasets))
    text = json.dumps(entry).replace(str(root), str(target))
    return target / "coco_retrieval", json.loads(text)


def _project(tmp_path, datasets, yaml=TRAIN_YAML, model=None, run=None):
    cfg = tiny_project(yaml, datasets, tmp_path / "out", model=model, run={**TINY_RUN, **(run or {})})
    return write_project(cfg, tmp_path / "project.yaml")


def _fails(capsys, command, path, *options, expected):
    argv = [command, "--cfg-path", str(path)] + (["--options", *options] if options else [])
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lavis-accel: error:")]
    assert status == 2 and len(lines) == 1, err[-2000:]
    assert expected in lines[0], lines[0]
    return lines[0]


def _train_json(directory):
    return directory / "annotations" / "coco_karpathy_train.json"


def _rewrite(path, change):
    entries = json.loads(path.read_text())
    path.write_text(json.dumps(change(entries)))


# ---- the config file and --options ----

def test_a_binary_file_as_yaml(tmp_path, capsys):
    path = tmp_path / "model.pth"
    path.write_bytes(bytes(range(256)) * 4)
    _fails(capsys, "train", path, expected="is not a text file")


def test_a_null_dataset_entry(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: {arch: blip_retrieval, model_type: coco}\ndatasets:\n  coco_retrieval:\n"
                    "run: {task: retrieval, seed: 1, output_dir: out}\n")
    _fails(capsys, "train", path, expected="datasets.coco_retrieval must be a mapping")


def test_an_unclosed_list_in_options(data, tmp_path, capsys):
    _fails(capsys, "train", _project(tmp_path, data[1]), "run.valid_splits=[val", expected="--options:")


def test_a_misspelt_options_key_is_refused_with_a_suggestion(data, tmp_path, capsys):
    _fails(capsys, "train", _project(tmp_path, data[1]), "run.max_epochs=1",
           expected="--options run.max_epochs: no such setting (did you mean run.max_epoch")


def test_options_keys_that_lavis_reads_are_accepted(data, tmp_path):
    from lavis_accel.jobs import load_config

    cfg = load_config(_project(tmp_path, data[1]), ["run.log_freq=5", "model.vit_grad_ckpt=False",
                                                    "run.on_bad_sample=skip", "model.load_strict=False"])
    assert cfg.run_cfg.log_freq == 5 and cfg.model_cfg.load_strict is False


@pytest.mark.parametrize("options, expected", [
    (["run.batch_size_train=0"], "run.batch_size_train must be an integer of at least 1, not 0"),
    (["run.batch_size_train=-4"], "run.batch_size_train must be an integer of at least 1, not -4"),
    (["run.batch_size_eval=0"], "run.batch_size_eval must be an integer of at least 1"),
    (["run.max_epoch=0"], "run.max_epoch must be an integer of at least 1"),
    (["run.device=tpu9"], "run.device 'tpu9' is not a torch device"),
    (["run.seed=abc"], "run.seed must be an integer"),
    (["run.num_workers=-1"], "run.num_workers must be an integer of at least 0"),
    (["run.runner=runner_bse"], "run.runner 'runner_bse' is not registered"),
    (["run.k_test=0"], "run.k_test must be an integer of at least 1, not 0"),
    (["run.valid_splits=[dev]"], "run.valid_splits: no dataset has a 'dev' split"),
    (["run.on_bad_sample=ignore"], "run.on_bad_sample must be one of error, skip"),
    (["run.init_lr=fast"], "run.init_lr must be a number"),
])
def test_bad_run_settings(data, tmp_path, capsys, options, expected):
    _fails(capsys, "train", _project(tmp_path, data[1]), *options, expected=expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cuda_on_a_machine_without_it(data, tmp_path, capsys):
    _fails(capsys, "train", _project(tmp_path, data[1]), "run.device=cuda",
           expected="run.device 'cuda': this machine has no CUDA device (set run.device=cpu)")


def test_an_output_dir_under_a_file(data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(capsys, "train", _project(tmp_path, data[1], run={"output_dir": str(blocker / "out")}),
           expected=f"run.output_dir: {blocker / 'out'} is not a folder ({blocker} is a file)")


def test_a_reducer_block_on_an_arch_without_a_binding(data, tmp_path, capsys):
    path = _project(tmp_path, data[1], model={"reducer": {"name": "turbo", "r": 4}})
    _fails(capsys, "train", path, expected="model.reducer: blip_retrieval has no token-reduction binding: use "
                                           "blip_retrieval_turbo")


def test_a_bad_reducer_setting_fails_before_the_model_is_built(data, tmp_path, capsys, monkeypatch):
    from lavis.models.blip_models.blip_retrieval import BlipRetrieval

    monkeypatch.setattr(BlipRetrieval, "from_config", classmethod(lambda cls, cfg: pytest.fail("model built")))
    path = _project(tmp_path, data[1], model={"arch": "blip_retrieval_turbo"})
    _fails(capsys, "train", path, "model.reducer.alpha=-1", expected="alpha")


def test_a_misspelt_reducer_option_gets_the_reducer_settings_as_hints(data, tmp_path, capsys):
    """Reducer settings the yaml's block does not list (``scale_alpha``) are known keys of ``--options`` too."""
    path = _project(tmp_path, data[1], model={"arch": "blip_retrieval_turbo"})
    _fails(capsys, "train", path, "model.reducer.scale_alfa=True",
           expected="--options model.reducer.scale_alfa: no such setting (did you mean model.reducer.scale_alpha?)")


# ---- annotation files and images ----

@pytest.mark.parametrize("content, expected", [
    ("[{\"caption\": ", "is not valid JSON (line 1"),
    ("{\"a\": 1}", "must hold a JSON list of entries, not a dict"),
    ("[]", "has no entries"),
])
def test_malformed_annotation_files(data, tmp_path, capsys, content, expected):
    directory, datasets = _copy_dataset(data, tmp_path)
    _train_json(directory).write_text(content)
    _fails(capsys, "train", _project(tmp_path, datasets),
           expected=f"datasets.coco_retrieval.build_info.annotations.train: {_train_json(directory)} {expected}")


@pytest.mark.parametrize("change, expected", [
    (lambda e: [{k: v for k, v in e[0].items() if k != "caption"}] + e[1:], "entry 0 has no 'caption'"),
    (lambda e: [{k: v for k, v in e[0].items() if k != "image"}] + e[1:], "entry 0 has no 'image'"),
    (lambda e: e[:2] + [{**e[2], "caption": 17}] + e[3:], "entry 2 'caption' must be a string, not int"),
    (lambda e: e[:1] + [{**e[1], "caption": None}] + e[2:], "entry 1 'caption' must be a string, not NoneType"),
    (lambda e: e[:3] + ["a caption"] + e[4:], "entry 3 is a str, not an object"),
])
def test_bad_annotation_entries(data, tmp_path, capsys, change, expected):
    directory, datasets = _copy_dataset(data, tmp_path)
    _rewrite(_train_json(directory), change)
    line = _fails(capsys, "train", _project(tmp_path, datasets), expected=expected)
    assert "run.on_bad_sample=skip leaves them out" in line


def _bomb_png(path, width=14000, height=14000):
    """A real 1x1 PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    from PIL import Image

    Image.new("L", (1, 1)).save(path, format="PNG")  # under the .jpg name: PIL reads the content
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.unlink(), "does not exist"),
    (lambda p: p.write_bytes(b""), "cannot be opened as an image"),
    (lambda p: p.write_text("not an image"), "cannot be opened as an image"),
    (lambda p: _bomb_png(p), "is too large to decode"),
])
def test_bad_images_stop_the_run_before_any_step(data, tmp_path, capsys, damage, expected):
    directory, datasets = _copy_dataset(data, tmp_path)
    image = json.loads(_train_json(directory).read_text())[5]["image"]
    damage(directory / "images" / image)
    _fails(capsys, "train", _project(tmp_path, datasets), expected=f"entry 5 image {directory / 'images' / image} "
                                                                   f"{expected}")


def test_a_corrupt_test_image_stops_the_run_before_training(data, tmp_path, capsys):
    directory, datasets = _copy_dataset(data, tmp_path)
    test_json = directory / "annotations" / "coco_karpathy_test.json"
    image = json.loads(test_json.read_text())[3]["image"]
    (directory / "images" / image).write_bytes(b"\0" * 10)
    _fails(capsys, "train", _project(tmp_path, datasets), expected="annotations.test")
    assert not list((tmp_path / "out").glob("*/log.txt"))


def test_k_test_larger_than_the_gallery(data, tmp_path, capsys):
    _fails(capsys, "evaluate", _project(tmp_path, data[1], yaml=EVAL_YAML, run={"k_test": 100}),
           expected="run.k_test 100 is larger than the test split of datasets.coco_retrieval (4 images, 20 texts)")


def test_a_truncated_jpeg_warns(data, tmp_path, caplog):
    from lavis_accel.data_checks import inspect_image

    directory, _ = _copy_dataset(data, tmp_path)
    image = directory / "images" / json.loads(_train_json(directory).read_text())[0]["image"]
    assert inspect_image(str(image)) == (None, False)
    image.write_bytes(image.read_bytes()[:-200])
    assert inspect_image(str(image)) == (None, True)


def test_skip_leaves_bad_samples_out_and_trains(data, tmp_path, caplog):
    directory, datasets = _copy_dataset(data, tmp_path)
    entries = json.loads(_train_json(directory).read_text())
    (directory / "images" / entries[7]["image"]).unlink()
    _rewrite(_train_json(directory), lambda e: e[:2] + [{**e[2], "caption": None}] + e[3:])
    status = cli.main(["train", "--cfg-path", _project(tmp_path, datasets, run={"on_bad_sample": "skip"})])
    err = caplog.text
    assert status == 0
    bad_entries = sum(1 for entry in entries if entry["image"] == entries[7]["image"]) + 1
    assert f"skipped {bad_entries} of {len(entries)} entries (run.on_bad_sample=skip)" in err
    assert err.count("skipped: datasets.coco_retrieval") == bad_entries


# ---- checkpoints ----

def test_a_caption_checkpoint_in_the_retrieval_model_is_refused(data, tmp_path, capsys):
    from lavis_accel.testing.tiny_models import build_tiny

    caption = tmp_path / "caption.pth"
    torch.save({"model": build_tiny("blip_caption", "base_coco").state_dict()}, caption)
    path = _project(tmp_path, data[1], yaml=EVAL_YAML, model={"load_finetuned": True, "finetuned": str(caption)})
    line = _fails(capsys, "evaluate", path, expected=f"model.finetuned: {caption} leaves")
    assert "parameters of BlipRetrieval unset, e.g. " in line and "model.load_strict=False" in line
    status = cli.main(["evaluate", "--cfg-path", path, "--options", "model.load_strict=False"])
    assert status == 0


def test_a_hostile_checkpoint_is_refused_through_the_cli(data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pth"
    torch.save({"model": {}, "payload": _Hostile(str(marker))}, hostile)
    _fails(capsys, "evaluate", _project(tmp_path, data[1], yaml=EVAL_YAML,
                                        model={"load_finetuned": True, "finetuned": str(hostile)}),
           expected=f"model.finetuned: {hostile} is refused: loading it would import")
    assert not marker.exists()


@pytest.mark.parametrize("key", ["finetuned", "resume"])
def test_text_checkpoints(data, tmp_path, capsys, key):
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes\n")
    model, run = ({"load_finetuned": True, "finetuned": str(text)}, {}) if key == "finetuned" else \
        ({}, {"resume_ckpt_path": str(text)})
    setting = "model.finetuned" if key == "finetuned" else "run.resume_ckpt_path"
    _fails(capsys, "train", _project(tmp_path, data[1], model=model, run=run),
           expected=f"{setting}: {text} is not a torch checkpoint")


def test_a_resume_file_without_optimizer(data, tmp_path, capsys):
    from lavis_accel.testing.tiny_models import build_tiny

    weights = tmp_path / "weights.pth"
    torch.save({"model": build_tiny("blip_retrieval", "coco").state_dict(), "epoch": 0}, weights)
    _fails(capsys, "train", _project(tmp_path, data[1], run={"resume_ckpt_path": str(weights)}),
           expected=f"run.resume_ckpt_path: {weights} has no optimizer")


# ---- job folders ----

def test_job_folders_never_collide(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from lavis_accel import job_dirs

    monkeypatch.setattr(job_dirs.time, "strftime", lambda fmt: "20261126120000")  # all start in the same second
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: job_dirs.reserve_job_dir(str(tmp_path)), range(64)))
    assert len(set(ids)) == 64 and len(os.listdir(tmp_path)) == 64


def test_two_runs_of_one_yaml_get_their_own_folders(data, tmp_path):
    path = _project(tmp_path, data[1], yaml=EVAL_YAML)
    assert cli.main(["evaluate", "--cfg-path", path]) == 0
    assert cli.main(["evaluate", "--cfg-path", path]) == 0
    folders = sorted((tmp_path / "out").iterdir())
    assert len(folders) == 2
    for folder in folders:
        with open(folder / "evaluate.txt", encoding="utf-8") as f:
            assert len(f.readlines()) == 1  # nobody appended to another run's log


def test_offline_load_model_and_preprocess_names_the_url(tmp_path, monkeypatch):
    import urllib.error

    import torch.hub
    from lavis.models import load_model_and_preprocess

    from lavis_accel.errors import SettingError

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # an empty download cache
    with pytest.raises(SettingError, match=r"^model.finetuned: cannot download https://\S+/blip_coco_retrieval"
                                           r"\.pth \(no network\); offline, fetch it elsewhere and point "
                                           r"model.finetuned at the local file"):
        load_model_and_preprocess("blip_retrieval_turbo", "coco", is_eval=True)


# ---- settings LAVIS's own building code cannot use ----

def _set(path, value):
    """A config change: ``path`` (dotted) set to ``value``."""
    def change(cfg):
        OmegaConf.update(cfg, path, value, merge=False)
    return change


@pytest.mark.parametrize("change, expected", [
    (_set("datasets", {}), "datasets: the config names no dataset"),
    (_set("model.image_size", "abc"), "model (blip_retrieval): building it failed with TypeError"),
    (_set("model.queue_size", "big"), "model (blip_retrieval): building it failed with TypeError"),
    (_set("datasets.coco_retrieval.vis_processor.train.image_size", 0),
     "datasets.coco_retrieval (train): its first sample fails with ValueError: height and width must be > 0"),
    (_set("datasets.coco_retrieval.text_processor.train.name", "blip_captoin"),
     "datasets.coco_retrieval.text_processor.train.name 'blip_captoin' is not registered (did you mean "
     "blip_caption"),
    (_set("run.warmup_steps", -1), "run.warmup_steps must be an integer of at least 0, not -1"),
])
def test_settings_lavis_cannot_use(data, tmp_path, capsys, change, expected):
    cfg = OmegaConf.load(_project(tmp_path, data[1]))
    change(cfg)
    _fails(capsys, "train", write_project(cfg, tmp_path / "changed.yaml"), expected=expected)


def test_an_annotation_path_that_is_a_folder(data, tmp_path, capsys):
    cfg = OmegaConf.load(_project(tmp_path, data[1]))
    cfg.datasets.coco_retrieval.build_info.annotations.train.storage = str(tmp_path)
    _fails(capsys, "train", write_project(cfg, tmp_path / "changed.yaml"),
           expected=f"annotations.train: {tmp_path} cannot be read: Is a directory")


def test_a_quoted_number_is_read_as_lavis_reads_it(data, tmp_path):
    from lavis_accel.jobs import load_config

    assert load_config(_project(tmp_path, data[1], run={"init_lr": "2e-5"})).run_cfg.init_lr == "2e-5"


def test_reading_the_first_samples_leaves_the_random_streams_as_they_were(data, tmp_path):
    import random

    import numpy as np

    from lavis_accel.data_checks import check_first_samples

    class RandomSample(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return torch.rand(1), np.random.rand(), random.random()

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    check_first_samples({"random": {"train": RandomSample()}})
    after = (torch.rand(1), np.random.rand(), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    assert after == (torch.rand(1), np.random.rand(), random.random())
