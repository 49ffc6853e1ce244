"""The CLI answers --help and turns bad input into one line naming the setting or file, exit status 2."""
import subprocess
import sys

import pytest
import yaml

from lavis_accel import cli

RETRIEVAL_CFG = {
    "model": {"arch": "blip_retrieval", "model_type": "coco"},
    "datasets": {"coco_retrieval": {"build_info": {
        "annotations": {"test": {"storage": "/nonexistent/ann/coco_karpathy_test.json"}},
        "images": {"storage": "/nonexistent/images"},
    }}},
    "run": {"task": "retrieval", "device": "cpu", "distributed": False, "output_dir": "out", "seed": 42},
}


def write_cfg(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_cli(capsys, *argv):
    status = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    return status, err


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "lavis_accel.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("train", "evaluate"):
        assert command in out.stdout


def test_module_entry_points_answer_help():
    for module in ("lavis_accel.train", "lavis_accel.evaluate"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--cfg-path" in out.stdout


def test_missing_config_one_line_exit_2():
    out = subprocess.run([sys.executable, "-m", "lavis_accel.cli", "evaluate", "--cfg-path", "/no/such.yaml"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == ["lavis-accel: error: config file not found: /no/such.yaml"]


def test_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n  arch: x\n")
    status, err = run_cli(capsys, "train", "--cfg-path", str(path))
    assert status == 2 and "not valid YAML" in err and str(path) in err and "\n" not in err


@pytest.mark.parametrize("patch, expected", [
    ({"model": {"arch": "blip_retreival", "model_type": "coco"}}, "model.arch 'blip_retreival' is not registered"),
    ({"model": {"arch": "blip_retrieval", "model_type": "cocoa"}}, "model.model_type 'cocoa' is not a type of"),
    ({"run": {"task": "retreival"}}, "run.task 'retreival' is not registered"),
])
def test_unknown_names(tmp_path, capsys, patch, expected):
    cfg = {**RETRIEVAL_CFG, **{k: {**RETRIEVAL_CFG[k], **v} for k, v in patch.items()}}
    status, err = run_cli(capsys, "evaluate", "--cfg-path", write_cfg(tmp_path, cfg))
    assert status == 2 and expected in err


def test_unknown_arch_suggests_close_name(tmp_path, capsys):
    cfg = {**RETRIEVAL_CFG, "model": {"arch": "blip_retreival", "model_type": "coco"}}
    _, err = run_cli(capsys, "evaluate", "--cfg-path", write_cfg(tmp_path, cfg))
    assert "did you mean blip_retrieval" in err


def test_missing_section(tmp_path, capsys):
    cfg = {k: v for k, v in RETRIEVAL_CFG.items() if k != "datasets"}
    status, err = run_cli(capsys, "evaluate", "--cfg-path", write_cfg(tmp_path, cfg))
    assert status == 2 and "no 'datasets:' section" in err


def test_dataset_path_that_does_not_exist(tmp_path, capsys):
    status, err = run_cli(capsys, "evaluate", "--cfg-path", write_cfg(tmp_path, RETRIEVAL_CFG))
    assert status == 2
    assert err.endswith("datasets.coco_retrieval.build_info.images.storage: /nonexistent/images does not exist")


def test_annotation_without_url_that_does_not_exist(tmp_path):
    from omegaconf import OmegaConf

    from lavis_accel.config_checks import check_dataset_paths
    from lavis_accel.errors import SettingError

    datasets = OmegaConf.create(RETRIEVAL_CFG["datasets"])
    datasets.coco_retrieval.build_info.images.storage = str(tmp_path)
    with pytest.raises(SettingError, match=r"annotations\.test\.storage: /nonexistent/ann/coco_karpathy_test.json"):
        check_dataset_paths(datasets)


def test_missing_checkpoint_file(tmp_path, capsys):
    ann = tmp_path / "test.json"
    ann.write_text("[]")
    cfg = yaml.safe_load(yaml.safe_dump(RETRIEVAL_CFG))
    cfg["datasets"]["coco_retrieval"]["build_info"] = {
        "annotations": {"test": {"storage": str(ann)}}, "images": {"storage": str(tmp_path)}}
    cfg["model"]["finetuned"] = "/no/such/checkpoint.pth"
    status, err = run_cli(capsys, "evaluate", "--cfg-path", write_cfg(tmp_path, cfg))
    assert status == 2 and err.endswith("model.finetuned: checkpoint file not found: /no/such/checkpoint.pth")


def test_options_must_be_key_value(tmp_path, capsys):
    status, err = run_cli(capsys, "evaluate", "--cfg-path", write_cfg(tmp_path, RETRIEVAL_CFG), "--options", "run")
    assert status == 2 and "--options: 'run' is not of the form key=value" in err


def test_options_override_is_checked(tmp_path, capsys):
    status, err = run_cli(capsys, "evaluate", "--cfg-path", write_cfg(tmp_path, RETRIEVAL_CFG),
                          "--options", "model.model_type=nope")
    assert status == 2 and "model.model_type 'nope'" in err
