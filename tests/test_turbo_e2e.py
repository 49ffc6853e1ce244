"""End to end: each Turbo evaluation project yaml (projects/turbo/eval) through the real CLI, on synthetic data.

Each project is made CPU-sized by ``tiny_project`` (tiny random model, synthetic datasets written once for the
module, reducer settings that merge at 37 tokens), written as yaml and run as ``python -m lavis_accel.cli evaluate``
in a subprocess, as a user runs it. The test reads the metrics files LAVIS's own task wrote.
"""
import glob
import json
import os
import subprocess
import sys

import pytest

from lavis_accel.datasets import write_caption, write_nlvr, write_retrieval, write_vqa
from lavis_accel.testing.projects import tiny_project, write_project

PROJECTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "turbo", "eval")
MERGING = {"reducer": {"r": 4, "threshold": 1}}  # 37 -> 21 tokens through the tiny ViT's 4 blocks
SIZES = {"n_train": 2, "n_val": 8, "n_test": 16}
RETRIEVAL_METRICS = {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean",
                     "r_mean", "agg_metrics"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``(root, datasets)``: the synthetic datasets every project reads; flickr30k reuses the retrieval files."""
    root = tmp_path_factory.mktemp("data")
    datasets = {**write_retrieval(root, **SIZES), **write_caption(root, **SIZES), **write_vqa(root, **SIZES),
                **write_nlvr(root, **SIZES)}
    datasets["flickr30k"] = datasets["coco_retrieval"]  # same LAVIS dataset classes and annotation format
    return root, datasets


def evaluate(project, data, output_dir, run):
    """Run the CLI's ``evaluate`` on the tiny version of ``project``; return LAVIS's job directory and the log."""
    root, datasets = data
    cfg = tiny_project(os.path.join(PROJECTS, project), datasets, output_dir / "output", model=MERGING,
                       run={"batch_size_eval": 8, **run}, cache_root=root)
    path = write_project(cfg, output_dir / project)
    result = subprocess.run([sys.executable, "-m", "lavis_accel.cli", "evaluate", "--cfg-path", path],
                            capture_output=True, text=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    (job_dir,) = [d for d in glob.glob(str(output_dir / "output" / "*")) if os.path.isdir(d)]
    return job_dir, log


def evaluate_lines(job_dir):
    """LAVIS's ``evaluate.txt``: one JSON object per evaluated split."""
    with open(os.path.join(job_dir, "evaluate.txt"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def result_file(job_dir, name):
    """A merged result file of LAVIS's ``save_result`` (``result/<name>.json``), parsed."""
    with open(os.path.join(job_dir, "result", f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def vqa_questions(data, split):
    """The questions of a synthetic VQA split, with their answers (LAVIS's ``vqa_<split>_eval.json``)."""
    _, datasets = data
    (main_file,) = [path for path in datasets["coco_vqa"]["build_info"]["annotations"][split]["storage"]
                    if os.path.basename(path) == f"vqa_{split}_eval.json"]
    with open(main_file, encoding="utf-8") as f:
        return json.load(f)


def assert_ran_with_the_tiny_reducer(log, arch):
    """The run's printed config is the Turbo variant with the test's reducer settings, and the model logged the
    token schedule they give its 37-token ViT (r=4 in each of its 4 blocks)."""
    assert f'"arch": "{arch}"' in log
    assert '"r": 4' in log and '"threshold": 1' in log
    assert "turbo (r=4, alpha=5, threshold=1) keeps ViT tokens 37 -> 33 -> 29 -> 25 -> 21" in log


@pytest.mark.parametrize("project", ["ret_coco_eval.yaml", "ret_flickr_eval.yaml"])
def test_retrieval_projects_report_recall(project, data, tmp_path):
    job_dir, log = evaluate(project, data, tmp_path, {"k_test": 4})
    assert_ran_with_the_tiny_reducer(log, "blip_retrieval_turbo")
    (metrics,) = evaluate_lines(job_dir)  # test split only
    assert set(metrics) == RETRIEVAL_METRICS
    for side in ("txt", "img"):
        assert 0 <= metrics[f"{side}_r1"] <= metrics[f"{side}_r5"] <= metrics[f"{side}_r10"] <= 100


def test_caption_project_reports_coco_metrics(data, tmp_path):
    job_dir, log = evaluate("caption_coco_eval.yaml", data, tmp_path, {"max_len": 8, "min_len": 2})
    assert_ran_with_the_tiny_reducer(log, "blip_caption_turbo")
    results = result_file(job_dir, "test_epochbest")
    assert len(results) == SIZES["n_test"] and all(isinstance(r["caption"], str) for r in results)
    (line,) = evaluate_lines(job_dir)
    metrics = line["test"]
    assert {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(metrics)
    assert "SPICE" not in metrics and "SPICE skipped" in log  # offline: skipped with a warning, never 0
    assert all(value >= 0 for value in metrics.values())


def test_vqa_project_reports_accuracy(data, tmp_path):
    job_dir, log = evaluate("vqav2_eval.yaml", data, tmp_path, {"num_ans_candidates": 8})
    assert_ran_with_the_tiny_reducer(log, "blip_vqa_turbo")
    truth = {q["question_id"]: q["answer"][0] for q in vqa_questions(data, "val")}
    answers = {a["question_id"]: a["answer"] for a in result_file(job_dir, "val_vqa_result")}
    assert answers.keys() == truth.keys()
    (metrics,) = evaluate_lines(job_dir)  # val split only, written without the split name
    # the official VQA evaluation over ten identical human answers: an answer scores 100 or 0
    expected = 100 * sum(answers[q] == truth[q] for q in truth) / len(truth)
    assert metrics.pop("agg_metrics") == pytest.approx(expected, abs=0.01)
    assert metrics and set(metrics) <= {"yes/no", "number", "other"}  # accuracy per answer type


def test_nlvr_project_reports_accuracy_on_val_and_test(data, tmp_path):
    job_dir, log = evaluate("nlvr_eval.yaml", data, tmp_path, {})
    assert_ran_with_the_tiny_reducer(log, "blip_nlvr_turbo")
    lines = evaluate_lines(job_dir)
    assert [list(line) for line in lines] == [["val"], ["test"]]
    for line, n in zip(lines, (SIZES["n_val"], SIZES["n_test"])):
        (split,) = line
        assert 0 <= line[split]["agg_metrics"] == line[split]["acc"] <= 1
        assert len(result_file(job_dir, f"{split}_epochbest")) == n
