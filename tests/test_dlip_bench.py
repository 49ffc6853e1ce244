"""``lavis-accel bench`` on DLIP's student archs: the full-size LAVIS parent row (blip_retrieval / blip_caption at
the mapped model type) against the student row, at tiny size. No timing is asserted."""
import json

import pytest
import torch
from omegaconf import OmegaConf

import lavis_accel  # noqa: F401  (registers the DLIP archs)
from lavis.models.blip_models.blip_caption import BlipCaption
from lavis.models.blip_models.blip_retrieval import BlipRetrieval
from lavis_accel.bench import report, runner, worker
from lavis_accel.bench.build import arch_spec, build_models, parent_label
from lavis_accel.bench.runner import BenchOptions, run_benchmark
from lavis_accel.bench.settings import PARENT, STUDENT, student_settings
from lavis_accel.models.dlip import DlipCaption, DlipRetrieval
from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE, TINY_MED_CONFIG, tiny_model_config
from machine_load import FixedLoad

CPU = torch.device("cpu")


def shrink(spec, tmp_path, student: bool):
    """Make ``spec`` tiny in place; the student smaller still (2 ViT blocks, a 1-layer BERT) than the tiny parent
    (4 blocks, 3 layers), as the real student is smaller than BLIP-base."""
    spec.config = OmegaConf.merge(spec.config, tiny_model_config(spec.arch, spec.model_type))
    if student:
        med = json.loads(open(TINY_MED_CONFIG, encoding="utf-8").read())
        path = tmp_path / "med_config_student.json"
        path.write_text(json.dumps({**med, "num_hidden_layers": 1}))
        spec.config = OmegaConf.merge(spec.config, {"vit_depth": 2, "med_config_path": str(path)})


def tiny_student_bench(arch, model_type, tmp_path, parts, candidates=1):
    spec = arch_spec(arch, model_type)
    shrink(spec, tmp_path, student=True)
    shrink(spec.parent, tmp_path, student=False)
    torch.manual_seed(0)
    models = build_models(spec)
    settings = student_settings(parent_label(spec), f"{arch} / {model_type}")
    options = BenchOptions(parts=parts, batch_size=2, task_batch_size=1, candidates=candidates, warmup=0,
                           repeats=2, device=CPU)
    identity = {"arch": arch, "model_type": model_type, "parent_arch": spec.parent.arch,
                "parent_model_type": spec.parent.model_type}
    return models, run_benchmark(models, settings, options, TINY_IMAGE_SIZE, identity)


def test_a_student_arch_is_compared_with_its_full_size_lavis_parent():
    retrieval = arch_spec("dlip_retrieval", "flickr")
    assert retrieval.is_student and retrieval.arch_class is DlipRetrieval
    assert (retrieval.parent.arch, retrieval.parent.model_type, retrieval.parent.parent_class) == (
        "blip_retrieval", "flickr", BlipRetrieval)
    assert retrieval.parent.config.vit_type == "base" and retrieval.config.vit_type == "small"
    assert parent_label(retrieval) == "blip_retrieval / flickr"
    caption = arch_spec("dlip_caption", "flickr")  # LAVIS has no blip_caption flickr
    assert (caption.parent.arch, caption.parent.model_type, caption.parent.parent_class) == (
        "blip_caption", "base_coco", BlipCaption)
    assert parent_label(caption) == "blip_caption / base_coco; LAVIS has no blip_caption flickr"
    assert [s.label for s in student_settings(parent_label(caption), "dlip_caption / flickr")] == [
        "parent (LAVIS blip_caption / base_coco; LAVIS has no blip_caption flickr)", "student (dlip_caption / flickr)"]
    assert not arch_spec("blip_retrieval_turbo", "coco").is_student  # a reducer arch: its parent is itself patched


def test_the_parent_type_comes_from_the_student_class_s_table(monkeypatch):
    monkeypatch.setattr(DlipRetrieval, "PARENT_MODEL_TYPES", {"flickr": "coco", "coco": "coco"}, raising=False)
    assert arch_spec("dlip_retrieval", "flickr").parent.model_type == "coco"
    monkeypatch.setattr(DlipRetrieval, "PARENT_MODEL_TYPES", {"coco": "coco"}, raising=False)
    with pytest.raises(ValueError, match="--model-type 'flickr': dlip_retrieval has no full-size blip_retrieval"):
        arch_spec("dlip_retrieval", "flickr")
    monkeypatch.delattr(DlipRetrieval, "PARENT_MODEL_TYPES")
    assert not arch_spec("dlip_retrieval", "flickr").is_student


def test_the_student_row_reads_fewer_parameters_and_counts_fewer_gflops_than_blip_retrieval(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "OtherLoad", FixedLoad(0.0))
    models, records = tiny_student_bench("dlip_retrieval", "flickr", tmp_path, ("vision", "task"), candidates=2)
    assert isinstance(models[PARENT], BlipRetrieval) and not isinstance(models[PARENT], DlipRetrieval)
    assert isinstance(models[STUDENT], DlipRetrieval)
    parent, student = records
    assert (parent["setting"], student["setting"]) == ("parent (LAVIS blip_retrieval / flickr)",
                                                      "student (dlip_retrieval / flickr)")
    assert (parent["role"], student["role"], student["parent_arch"]) == (PARENT, STUDENT, "blip_retrieval")
    assert student["task"] == parent["task"] == "retrieval: ITC + ITM over k=2"
    assert student["params"] < parent["params"] < parent["params_total"]  # momentum copies are not read
    assert student["params_share"] == pytest.approx(student["params"] / parent["params"])
    assert 0 < student["vision_gflops"] < parent["vision_gflops"] and 0 < student["task_gflops"] < parent["task_gflops"]
    assert student["vision_flops_ratio"] > 1.0 and student["flops_ratio"] > 1.0 == parent["flops_ratio"]
    assert student["vision_gflops"] == pytest.approx(student["vision_gflops_analytic"])  # 2 blocks, not the parent's 4
    assert student["vision_tokens_out"] == parent["vision_tokens_out"] == 37  # the same images, 6 x 6 patches
    assert student["speedup"] > 0 and student["speedup_vs_sdpa"] is None and student["flops_ratio_vs_sdpa"] is None
    paths = report.write_reports(records, str(tmp_path / "out"))
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "compared with LAVIS's blip_retrieval / flickr" in table and "| student (dlip_retrieval / flickr) |" in table
    assert f"| {student['params'] / 1e6:.1f} ({student['params_share']:.0%}) |" in table
    assert (tmp_path / "out" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(paths) == 3


def test_the_caption_student_searches_beams_as_its_parent_does(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "OtherLoad", FixedLoad(0.0))
    models, (parent, student) = tiny_student_bench("dlip_caption", "coco", tmp_path, ("task",))
    assert parent["setting"] == "parent (LAVIS blip_caption / base_coco; LAVIS has no blip_caption coco)"
    assert student["task"].startswith("caption: beam search") and student["params"] < parent["params"]
    step = runner.task_step(models[STUDENT], runner.StepInputs(1, TINY_IMAGE_SIZE, CPU))
    with torch.no_grad():
        assert step.run() == step.run()  # beam search is deterministic (DLIP's generate samples by default)


@pytest.mark.parametrize("extra, message", [
    (["--r", "8"], "--r: dlip_retrieval is a distilled student, compared as itself with blip_retrieval / flickr; "
                   "it takes no reducer settings"),
    (["--reducer", "turbo"], "--reducer: dlip_retrieval is a distilled student"),
    (["--sweep"], "--sweep: not for a distilled student yet"),
    (["--compare-dtype", "bf16"], "--compare-dtype: not for a distilled student yet"),
])
def test_the_worker_refuses_reducer_options_for_a_student_in_one_line(extra, message, capsys):
    assert worker.main(["--arch", "dlip_retrieval", "--model-type", "flickr", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_student_type_without_a_parent_type_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(DlipCaption, "PARENT_MODEL_TYPES", {"coco": "base_coco"})
    assert worker.main(["--arch", "dlip_caption", "--model-type", "flickr"]) == 2
    assert "--model-type 'flickr': dlip_caption has no full-size blip_caption to compare with; use one of coco" in \
        capsys.readouterr().err
