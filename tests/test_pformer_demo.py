"""``lavis-accel pformer-demo``: its settings, how it scores captions, and one tiny run of the whole command."""
import argparse
import json
import math
import os

import pytest
from omegaconf import OmegaConf

from lavis_accel.errors import SettingError
from lavis_accel.pformer_demo import add_arguments, run
from lavis_accel.pformer_demo.scoring import caption_scores, objects_named, paired_difference
from lavis_accel.pformer_demo.settings import PformerDemoSettings

TINY = ["--pairs", "8", "--held-out", "4", "--sentences", "64", "--llm-steps", "3", "--stage0-epochs", "1",
        "--stage1-epochs", "1", "--stage2-epochs", "1", "--batch-size", "4", "--max-caption-tokens", "6"]


@pytest.mark.parametrize("changes, message", [
    ({"pairs": 0}, "--pairs must be at least 1"),
    ({"stage2_epochs": 0}, "--stage2-epochs must be at least 1"),
    ({"stage1_weight": 0.0}, "--stage1-weight must be positive"),
    ({"batch_size": 32, "pairs": 16}, r"--batch-size \(32\) must not exceed --pairs \(16\)"),
    ({"image_size": 40}, "--image-size must be a multiple of the ViT's patch"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(SettingError, match=message):
        PformerDemoSettings(**changes).check()


def test_captions_are_parsed_in_both_orders_of_the_data():
    things, objects = objects_named("two shapes a red circle on the left and a blue square in the top right corner")
    assert things == {("red", "circle"), ("blue", "square")}
    assert objects == {("red", "circle", "left"), ("blue", "square", "top right")}
    _, placed_first = objects_named("at the top a green triangle and in the center an orange diamond")
    assert placed_first == {("green", "triangle", "top"), ("orange", "diamond", "center")}
    assert objects_named("a red a circle on") == (set(), set())


def test_caption_scores_by_hand():
    truths = [[("red", "circle", "left")], [("blue", "square", "top"), ("green", "triangle", "center")]]
    generated = ["a red circle on the left", "a blue square on the left and a white diamond in the center"]
    scores = caption_scores(generated, truths)
    # pairs named: red circle (hit), blue square (hit), white diamond (miss); present: 3
    assert scores["thing_precision"] == pytest.approx(200 / 3)
    assert scores["thing_recall"] == pytest.approx(200 / 3)
    assert scores["thing_f1"] == pytest.approx(200 / 3)
    assert scores["exact_scene"] == pytest.approx(50.0)  # the second caption has a wrong position and object


def test_paired_difference_by_hand():
    mean, error = paired_difference([1.0, 2.0, 3.0], [1.5, 2.0, 4.0])
    assert mean == pytest.approx(0.5)
    assert error == pytest.approx(math.sqrt(0.25 / 3))


def test_the_command_trains_both_runs_alike_and_scores_them_on_the_same_held_out_images(tmp_path, capfd):
    workdir = tmp_path / "pformer_demo"
    args = add_arguments(argparse.ArgumentParser()).parse_args(["--workdir", str(workdir)] + TINY)
    assert run(args) == 0
    printed = capfd.readouterr().out
    results = json.loads((workdir / "results.json").read_text())
    rows = {row["run"]: row for row in results["rows"]}
    assert list(rows) == ["blip2", "pformer"]
    assert "| BLIP-2 (loss_weight 0) |" in printed and "| BLIP-2 + P-Former alignment |" in printed
    assert "effect" in results["verdict"][-1] and results["verdict"][-1] in (workdir / "results.md").read_text()
    for row in rows.values():
        assert row["pairs"] == 8 and row["held_out_images"] == 4
        assert math.isfinite(row["caption_loss"]) and row["perplexity"] == pytest.approx(math.exp(row["caption_loss"]))
        assert 0 <= row["thing_f1"] <= 100 and 0 <= row["exact_scene"] <= 100
        assert row["image_gain"] == pytest.approx(row["mismatched_loss"] - row["caption_loss"])
    assert rows["blip2"]["params"] == rows["pformer"]["params"]  # the same stock blip2_opt at inference

    # the same held-out images, scored image by image, in both runs
    held_out = json.loads(open(results["held_out"]).read())
    images = [entry["image"] for entry in held_out]
    for run_name in rows:
        assert [c["image"] for c in results["captions"][run_name]] == images
        assert len(results["per_image_caption_loss"][run_name]) == len(images)
    # none of them was trained on: not a pair, and no caption of theirs among the sentences
    held_out_captions = {caption for entry in held_out for caption in entry["captions"]}
    pairs = json.loads((workdir / "data" / "conceptual_caption_3m" / "annotations" / "cc3m.json").read_text())
    sentences = json.loads((workdir / "data" / "laion_sentence_115m" / "annotations" / "sentences.json").read_text())
    assert len(pairs) == 8 and not held_out_captions & {p["caption"] for p in pairs}
    assert sentences and not held_out_captions & {s["caption"] for s in sentences}

    # every stage trained (finite losses), each run's stage 2 from its own stage 1, with the configured weights
    logs = results["training_logs"]
    assert set(logs) == {"stage0", "blip2_stage1", "blip2_stage2", "pformer_stage1", "pformer_stage2"}
    for stage, lines in logs.items():
        assert lines and all(math.isfinite(float(line["train_loss"])) for line in lines), stage
    configs = workdir / "configs"
    for run_name, weights in (("blip2", (0.0, 0.0)), ("pformer", (10.0, 100.0))):
        stage1 = OmegaConf.load(configs / f"{run_name}_stage1.yaml")
        stage2 = OmegaConf.load(configs / f"{run_name}_stage2.yaml")
        assert (stage1.model.loss_weight, stage2.model.loss_weight) == weights
        assert stage2.model.pretrained.startswith(str(workdir / run_name / "stage1"))
        assert stage1.run.seed == stage2.run.seed == 42
        stage0 = [cfg.model.get("pretrained_stage0") for cfg in (stage1, stage2)]
        assert stage0 == ([None, None] if run_name == "blip2" else [results["stage0_checkpoint"]] * 2)
        assert rows[run_name]["checkpoint"].startswith(str(workdir / run_name / "stage2"))
    assert os.path.isfile(os.path.join(results["llm"], "config.json"))
