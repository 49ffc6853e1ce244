"""``lavis-accel bench``: FLOP counting (CPU attention included), the analytic ViT count, memory, parameters, the
interleaved timer's bookkeeping, settings, reports and one-line errors. No timing is asserted."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lavis_accel  # first: it makes torchvision importable for LAVIS on CPU-only machines
from lavis.models.vit import VisionTransformerEncoder
from lavis_accel.bench import flops, report, worker
from lavis_accel.bench.memory import ParameterUse, PeakMemory
from lavis_accel.bench.runner import BenchOptions, analytic_vision_gflops, run_benchmark
from lavis_accel.bench.settings import PARENT, REDUCED, BenchSetting, bench_settings, reducer_settings
from lavis_accel.bench.machine import machine_info
from lavis_accel.bench.throughput import Contender, median_and_spread, paired_ratio, time_interleaved
from lavis_accel.reduce.merge import parse_r, token_schedule
from lavis_accel.testing.hub import offline_env, write_offline_hub
from machine_load import FixedLoad

REQUIRED_KEYS = {"arch", "model_type", "reducer", "r", "vision_gflops", "task_gflops", "params", "throughput_median",
                 "throughput_spread", "speedup", "flops_ratio", "peak_mem_mb"}
CPU = torch.device("cpu")


def tiny_vit(img_size=64, depth=4):
    torch.manual_seed(0)
    return VisionTransformerEncoder(img_size=img_size, patch_size=8, embed_dim=32, depth=depth, num_heads=2).eval()


class VisionOnly(nn.Module):
    """The smallest model the bench's vision part accepts: a LAVIS ViT as ``visual_encoder``."""

    def __init__(self):
        super().__init__()
        self.visual_encoder = tiny_vit()


@pytest.mark.parametrize("with_mask", [False, True])
def test_cpu_attention_is_counted_with_the_hand_formula(with_mask):
    batch, heads, queries, keys, width, value_width = 2, 3, 5, 7, 8, 4
    q = torch.randn(batch, heads, queries, width)
    k = torch.randn(batch, heads, keys, width)
    v = torch.randn(batch, heads, keys, value_width)
    mask = torch.randn(batch, 1, 1, keys) if with_mask else None
    counted = flops.count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert counted == 2 * batch * heads * queries * keys * width + 2 * batch * heads * queries * keys * value_width


def test_fused_and_explicit_attention_count_the_same():
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    fused = flops.count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    explicit = flops.count_flops(lambda: ((q @ k.transpose(-2, -1)).softmax(-1)) @ v)
    assert fused == explicit > 0


def test_registering_the_formula_twice_changes_nothing():
    q = torch.randn(1, 1, 4, 4)
    first = flops.count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    flops.ensure_cpu_attention_formula()
    assert flops.count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == first


@pytest.mark.parametrize("name, r, threshold", [(None, 0, 1), ("tome", 0, 1), ("tome", 8, 1), ("turbo", 8, 1),
                                                 ("turbo", (8, -1), 1), ("turbo", 12, 40)])
def test_analytic_vit_flops_equal_the_counted_ones(name, r, threshold):
    model = VisionOnly()
    setting = BenchSetting(PARENT)
    if name is not None:
        setting = BenchSetting(REDUCED, reducer_settings(name, r, {"name": name, "threshold": threshold}))
    setting.activate(model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        counted = flops.count_flops(lambda: model.visual_encoder.forward_features(images)) / 2
    assert counted == pytest.approx(analytic_vision_gflops(model.visual_encoder, setting) * 1e9, rel=1e-12)


def test_analytic_schedule_merges_where_the_spec_says():
    # ViT-B/16 at 384 px with Turbo r=30: 577 tokens down to 217 (specs/methods.md 2.3)
    assert token_schedule(577, parse_r(12, 30), threshold=100)[-1] == 217
    full = flops.vit_flops([577] * 13, embed_dim=768, num_heads=12)
    assert full == pytest.approx(110.967164928e9, rel=1e-12)  # counted on LAVIS's ViT-B/16 at 384 px


def test_peak_memory_follows_live_tensors():
    layer = nn.Linear(100, 100)
    x = torch.randn(10, 100)
    element = 4

    def step():
        y = layer(x)  # 1000 floats
        z = y * 2  # 1000 more, both alive
        del y
        return z + 1  # y freed: two tensors alive again

    with torch.no_grad(), PeakMemory(CPU, list(layer.parameters()) + [x]) as memory:
        step()
    resident = (100 * 100 + 100 + 10 * 100) * element
    assert memory.peak_bytes == resident + 2 * 1000 * element


def test_parameter_use_counts_only_what_the_step_reads():
    model = nn.ModuleDict({"used": nn.Linear(4, 3), "momentum_copy": nn.Linear(4, 3)})
    with torch.no_grad(), ParameterUse(model) as use:
        model["used"](torch.randn(2, 4))
    assert use.count == 4 * 3 + 3


def test_time_interleaved_rotates_the_order_and_warms_up_each_setting():
    calls = []
    contenders = [Contender(name, lambda name=name: calls.append(("activate", name)),
                            lambda name=name: calls.append(("step", name))) for name in "abc"]
    rates = time_interleaved(contenders, samples_per_step=4, device=CPU, warmup=2, repeats=3)
    steps = [name for kind, name in calls if kind == "step"]
    assert steps[:6] == ["a", "a", "b", "b", "c", "c"]
    assert steps[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(values) == 3 and min(values) > 0 for values in rates.values())


def test_time_interleaved_adds_rounds_until_settled_and_repeats_short_steps():
    steps = []
    contenders = [Contender(name, lambda: None, lambda name=name: steps.append(name)) for name in "ab"]
    rates = time_interleaved(contenders, 1, CPU, warmup=0, repeats=2, max_repeats=5,
                             settled=lambda rates: len(rates["a"]) >= 4)
    assert [len(values) for values in rates.values()] == [4, 4]  # 2 rounds, then 2 more until settled
    steps.clear()
    time_interleaved(contenders, 1, CPU, warmup=0, repeats=1, min_time=0.01)
    assert steps.count("a") > 1 and steps.count("b") > 1  # each measurement repeated its step for 10 ms
    with pytest.raises(ValueError, match="max_repeats >= repeats"):
        time_interleaved(contenders, 1, CPU, repeats=3, max_repeats=2)


def test_paired_ratio_cancels_what_slows_a_whole_round():
    # each round the setting is 2x the baseline; the machine gets 3x slower from round 4 on, hitting the baseline of
    # round 4 but not yet the setting: the medians of the rates alone then come from different machine states
    baseline = [10.0, 10.0, 10.0, 3.0, 3.0, 3.0, 3.0]
    setting = [20.0, 20.0, 20.0, 20.0, 6.0, 6.0, 6.0]
    ratio = paired_ratio(setting, baseline)
    assert ratio.median == 2.0 and ratio.rounds == 7
    assert median_and_spread(setting)[0] / median_and_spread(baseline)[0] == pytest.approx(20 / 3)


def test_paired_ratio_interval_and_trust():
    noisy = paired_ratio([1.5, 2.5, 1.8, 2.2, 2.0, 1.6, 2.4], [1.0] * 7)
    assert noisy.median == 2.0 and (noisy.low, noisy.high) == (1.5, 2.5) and not noisy.trusted
    assert noisy.level == pytest.approx(1 - 2 / 2 ** 7)
    few = paired_ratio([2.0, 2.0, 2.0], [1.0] * 3)
    assert few.level == 0.75 and not few.trusted  # three rounds cannot give a 95 % interval
    tight = paired_ratio([1.99, 2.0, 2.01, 2.0, 1.98, 2.02, 2.0, 2.0], [1.0] * 8)
    assert tight.trusted and tight.low >= 1.98 and tight.high <= 2.02


def test_untrusted_speedups_are_warned_about_in_the_table_and_the_json(tmp_path, monkeypatch):
    from lavis_accel.bench import runner

    monkeypatch.setattr(runner, "OtherLoad", FixedLoad(0.0))  # a quiet machine
    settings = bench_settings(["tome"], [4], {"name": "turbo", "threshold": 1})
    options = BenchOptions(parts=("vision",), batch_size=2, warmup=0, repeats=3, device=CPU)
    records = run_benchmark(VisionOnly(), settings, options, 64, {"arch": "tiny", "model_type": "test"})
    assert records[2]["vision_speedup_ci_level"] == 0.75 and records[2]["vision_speedup_trusted"] is False
    report.write_reports(records, str(tmp_path), machine_info(CPU, torch.float32))
    written = json.loads((tmp_path / "bench.json").read_text())
    assert any(w.startswith("tome r=4: vision speed-up vs parent") and "not trustworthy: 3 rounds are too few for "
               "a 95% interval" in w for w in written["warnings"])
    assert not any(w.startswith("parent (LAVIS): vision speed-up vs parent") for w in written["warnings"])
    assert {"cpu", "logical_cpus", "torch_threads", "torch", "device", "dtype"} <= set(written["machine"])
    table = (tmp_path / "bench.md").read_text()
    assert "⚠ tome r=4: vision speed-up vs parent" in table and "x [" in table


def test_bf16_vision_step_keeps_the_token_schedule():
    settings = bench_settings(["tome"], [4], {"name": "turbo", "threshold": 1})
    options = BenchOptions(parts=("vision",), batch_size=2, warmup=0, repeats=1, device=CPU, dtype=torch.bfloat16)
    records = run_benchmark(VisionOnly(), settings, options, 64, {"arch": "tiny", "model_type": "test"})
    assert records[2]["dtype"] == "bfloat16"
    assert records[2]["vision_tokens_out"] == records[2]["vision_tokens_expected"] == 65 - 4 * 4


def test_median_and_spread():
    assert median_and_spread([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, 2.0)
    assert median_and_spread([5.0]) == (5.0, 0.0)


def test_bench_settings_add_parent_and_sdpa_and_carry_only_shared_settings():
    block = {"name": "turbo", "r": 30, "alpha": 5, "threshold": 100, "prop_attn": True}
    settings = bench_settings(["tome", "turbo"], [0, 30], block)
    labels = [setting.label for setting in settings]
    assert labels == ["parent (LAVIS)", "tome r=0 (SDPA only)", "tome r=30", "turbo r=0", "turbo r=30"]
    tome, turbo = settings[2].reducer, settings[4].reducer
    assert (tome.alpha, tome.threshold) == (0.0, 100)
    assert (turbo.alpha, turbo.threshold) == (5.0, 100)


def test_madtp_settings_run_at_each_temperature_and_record_the_kept_tokens():
    settings = bench_settings(["madtp"], [], {"name": "madtp", "temperature": 1.0}, [0.5, 4.0])
    assert [setting.label for setting in settings] == [
        "parent (LAVIS)", "madtp tau=0 (no pruning)", "madtp tau=0.5", "madtp tau=4"]
    options = BenchOptions(parts=("vision",), batch_size=2, warmup=0, repeats=2, device=CPU)
    parent, untouched, mild, strong = run_benchmark(VisionOnly(), settings, options, 64,
                                                    {"arch": "tiny", "model_type": "test"})
    assert parent["vision_token_counts"] is None and untouched["vision_token_counts"] == [65] * 5
    assert untouched["temperature"] == 0.0 and strong["temperature"] == 4.0
    assert strong["vision_tokens_out"] == strong["vision_token_counts"][-1] < 65
    assert strong["vision_flops_ratio"] > 1.0 and strong["vision_gflops_analytic"] is None
    with pytest.raises(ValueError, match="--temperature"):
        bench_settings(["madtp"], [], None, [])
    with pytest.raises(ValueError, match="'temperature'"):
        bench_settings(["madtp"], [], None, [-1.0])


def test_clip_is_benchmarked_on_its_image_tower_and_its_retrieval_step():
    from lavis_accel.testing.tiny_models import build_tiny

    model = build_tiny("clip", "ViT-Tiny-16", is_eval=True)
    settings = bench_settings(["madtp"], [], None, [1e4])
    options = BenchOptions(batch_size=2, task_batch_size=2, warmup=0, repeats=1, device=CPU)
    parent, untouched, pruned = run_benchmark(model, settings, options, 96, {"arch": "clip", "model_type": "tiny"})
    assert parent["vision_tokens_out"] == untouched["vision_tokens_out"] == 37  # 6 x 6 patches + [CLS]
    assert pruned["vision_tokens_out"] == pruned["vision_token_counts"][-1] < 37
    assert parent["task"].startswith("clip retrieval") and pruned["task_gflops"] < parent["task_gflops"]


def test_crossget_settings_cover_every_rv_and_rl_after_a_cross_token_baseline():
    settings = bench_settings(["crossget"], [0, 4], None, rl_values=[0, 2])
    assert [setting.label for setting in settings] == [
        "parent (LAVIS)", "crossget rv=0 rl=0 (cross tokens, no merging)", "crossget rv=0 rl=2",
        "crossget rv=4 rl=0", "crossget rv=4 rl=2"]
    assert settings[4].reducer.as_dict() == {"rv": 4, "rl": 2, "eot_guard": False, "name": "crossget"}
    # a CrossGET arch's block: ToMe ignores its rv/rl, CrossGET keeps its eot_guard
    block = {"name": "crossget", "rv": 16, "rl": 0, "eot_guard": True}
    tome, guarded = bench_settings(["tome", "crossget"], [8], block)[2:]
    assert tome.label == "tome r=8" and guarded.label == "crossget rv=8 rl=0 eot_guard"
    with pytest.raises(ValueError, match="--rl: only crossget merges text tokens"):
        bench_settings(["tome"], [8], None, rl_values=[2])
    with pytest.raises(ValueError, match="--rl: crossget's merges per block must be integers >= 0, got -1"):
        bench_settings(["crossget"], [8], None, rl_values=[-1])
    with pytest.raises(ValueError, match="--r: the arch has no crossget rv"):
        bench_settings(["crossget"], [], None)


def test_crossget_on_clip_reduces_the_image_tower_with_rv_and_the_text_tower_with_rl(monkeypatch):
    from lavis_accel.bench import runner
    from lavis_accel.testing.tiny_models import build_tiny

    monkeypatch.setattr(runner, "OtherLoad", FixedLoad(0.0))
    model = build_tiny("clip", "ViT-Tiny-16", is_eval=True)  # 36 patches + [CLS]: 4 image blocks; 3 text blocks
    settings = bench_settings(["crossget"], [4], None, rl_values=[0, 4])
    options = BenchOptions(parts=("vision", "text", "task"), batch_size=2, task_batch_size=1, warmup=0, repeats=1,
                           device=CPU)
    parent, baseline, image_only, both = run_benchmark(model, settings, options, 96,
                                                       {"arch": "clip", "model_type": "tiny"})
    # the cross token is one more key in every block: CrossGET merging nothing costs a little more than the parent
    assert baseline["vision_token_counts"] == [38, 38, 38, 38, 37] and baseline["text_token_counts"] == [78, 78, 78, 77]
    assert baseline["vision_gflops"] > parent["vision_gflops"]
    assert image_only["vision_token_counts"] == [38, 34, 30, 26, 21]  # 4 merges a block, the cross token dropped last
    assert image_only["vision_tokens_out"] == image_only["vision_tokens_expected"] == 21
    assert image_only["vision_gflops"] < parent["vision_gflops"] and image_only["task_gflops"] < parent["task_gflops"]
    assert image_only["text_gflops"] == baseline["text_gflops"]
    assert both["text_token_counts"] == [78, 74, 70, 65] and both["vision_gflops"] == image_only["vision_gflops"]
    assert both["text_gflops"] < image_only["text_gflops"] and both["text_gflops"] < parent["text_gflops"]
    assert both["task_gflops"] < image_only["task_gflops"]  # retrieval runs the text tower: rl shows there too
    assert both["pair_gflops"] == pytest.approx(both["vision_gflops"] + both["text_gflops"])
    assert both["pair_flops_ratio"] > image_only["pair_flops_ratio"] > 1.0 == parent["pair_flops_ratio"]
    assert (both["r"], both["rl"], parent["rl"]) == (4, 4, None) and both["vision_gflops_analytic"] is None
    table = report.markdown_table([parent, baseline, image_only, both])
    assert "| text GFLOPs | text tokens out |" in table and "| crossget rv=4 rl=4 |" in table


def test_crossget_on_blip_retrieval_reduces_the_vit_and_the_unimodal_text_pass():
    from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE, build_tiny

    model = build_tiny("blip_retrieval", "coco", is_eval=True)  # ViT: 36 patches + [CLS], 4 blocks; BERT: 3 layers
    settings = bench_settings(["crossget"], [4], None, rl_values=[0, 3])
    options = BenchOptions(parts=("vision", "text"), batch_size=2, warmup=0, repeats=1, device=CPU)
    parent, baseline, image_only, both = run_benchmark(model, settings, options, TINY_IMAGE_SIZE,
                                                       {"arch": "blip_retrieval", "model_type": "coco"})
    assert image_only["vision_token_counts"] == [38, 34, 30, 26, 21] == both["vision_token_counts"]
    assert image_only["vision_tokens_expected"] == 21 and image_only["vision_gflops_analytic"] is None
    assert image_only["vision_gflops"] < parent["vision_gflops"] < baseline["vision_gflops"]
    assert baseline["text_token_counts"] == [36, 36, 36, 35]  # 35 padded tokens and the (masked) cross token
    assert both["text_token_counts"] == [36, 33, 30, 26]
    assert both["text_gflops"] < image_only["text_gflops"] and both["text_gflops"] < parent["text_gflops"]
    assert both["task_gflops"] is None and both["pair_flops_ratio"] > image_only["pair_flops_ratio"] > 1.0


def test_the_worker_benches_a_crossget_arch_at_its_rv_and_each_rl(tmp_path, capsys):
    out = tmp_path / "bench"
    assert worker.main(["--arch", "clip_crossget", "--model-type", "ViT-Tiny-16", "--rl", "0", "4", "--parts",
                        "vision", "text", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                        "--out", str(out)]) == 0
    records = json.loads((out / "bench.json").read_text())["records"]
    assert [record["setting"] for record in records] == [
        "parent (LAVIS)", "crossget rv=0 rl=0 (cross tokens, no merging)", "crossget rv=16 rl=0",
        "crossget rv=16 rl=4"]  # rv from the arch's reducer block (16)
    assert records[2]["vision_token_counts"] == [38, 22, 12, 7, 4]  # the clamp (t - 2) // 2 binds from block 2
    assert records[3]["text_tokens_out"] < records[2]["text_tokens_out"] == 77
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert worker.main(["--arch", "clip", "--model-type", "ViT-Tiny-16", "--reducer", "crossget", "--r", "19",
                        "--parts", "vision", "--repeats", "1"]) == 2
    assert "'rv' of 'crossget' must be an integer from 0 to 18" in capsys.readouterr().err


def test_compare_dtype_times_both_precisions_side_by_side_and_reports_the_pooled_cosine(tmp_path, capsys):
    out = tmp_path / "bench"
    assert worker.main(["--arch", "clip", "--model-type", "ViT-Tiny-16", "--reducer", "crossget", "--r", "4",
                        "--parts", "vision", "--batch-size", "2", "--warmup", "0", "--repeats", "2",
                        "--compare-dtype", "bf16", "--out", str(out)]) == 0
    report_json = json.loads((out / "bench.json").read_text())
    precision = report_json["precision"]
    assert [p["setting"] for p in precision] == [r["setting"] for r in report_json["records"]]
    for record in precision:
        assert (record["dtype"], record["compared_dtype"], record["rounds"]) == ("float32", "bfloat16", 2)
        assert record["speedup"] > 0 and record["speedup_ci"][0] <= record["speedup"] <= record["speedup_ci"][1]
        assert 0.9 < record["pooled_cosine"] < 1.0  # bf16 rounds: close to fp32, never bit-equal
    assert "bfloat16 over float32" in (out / "bench.md").read_text()
    capsys.readouterr()
    for extra, message in ((["--compare-dtype", "fp32"], "--compare-dtype fp32 is --dtype already"),
                           (["--compare-dtype", "bf16", "--sweep"], "--compare-dtype: not with --sweep")):
        assert worker.main(["--arch", "clip", "--model-type", "ViT-Tiny-16", "--r", "4", *extra]) == 2
        assert message in capsys.readouterr().err


def test_a_crossget_blip_arch_takes_its_block_and_a_model_without_a_text_pass_refuses_the_text_part():
    from lavis_accel.bench.build import arch_spec
    from lavis_accel.bench.tasks import StepInputs, text_step
    from lavis.models.blip_models.blip_retrieval import BlipRetrieval

    spec = arch_spec("blip_retrieval_crossget", "coco")
    assert spec.parent_class is BlipRetrieval and spec.reducer_config["name"] == "crossget"
    labels = [setting.label for setting in bench_settings(["crossget"], [spec.reducer_config["rv"]],
                                                          spec.reducer_config)]
    assert labels[2] == "crossget rv=16 rl=0"
    with pytest.raises(ValueError, match="--parts text: VisionOnly has no unimodal text pass"):
        text_step(VisionOnly(), StepInputs(1, 64, CPU))


def test_bench_settings_need_a_reducer():
    with pytest.raises(ValueError, match="--reducer"):
        bench_settings([], [30], None)


def test_run_benchmark_writes_json_markdown_and_plot(tmp_path):
    settings = bench_settings(["tome", "turbo"], [4], {"name": "turbo", "threshold": 1})
    options = BenchOptions(parts=("vision",), batch_size=2, warmup=0, repeats=2, device=CPU)
    records = run_benchmark(VisionOnly(), settings, options, 64, {"arch": "tiny", "model_type": "test"})
    paths = report.write_reports(records, str(tmp_path))

    assert [os.path.basename(path) for path in paths] == ["bench.json", "bench.md", "bench.png"]
    loaded = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert len(loaded) == 4 and all(REQUIRED_KEYS <= set(record) for record in loaded)
    parent, sdpa, tome, turbo = loaded
    assert parent["vision_flops_ratio"] == 1.0 and tome["vision_flops_ratio"] > 1.0
    assert tome["vision_tokens_out"] == tome["vision_tokens_expected"] == 65 - 4 * 4
    assert all(record["vision_gflops"] == pytest.approx(record["vision_gflops_analytic"]) for record in loaded)
    assert loaded[0]["task_gflops"] is None  # the task part was not asked for
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "bench.md").read_text().count("\n| ") == 1 + len(records)


def test_worker_refuses_an_unknown_arch_in_one_line(capsys):
    assert worker.main(["--arch", "no_such_arch", "--model-type", "coco"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no_such_arch" in err and "\n" not in err


def test_worker_refuses_a_bad_count_in_one_line(capsys):
    assert worker.main(["--arch", "blip_retrieval", "--model-type", "coco", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


TASK_SCRIPT = textwrap.dedent("""
    import json, sys
    import lavis_accel
    from lavis_accel.bench.runner import BenchOptions, run_benchmark
    from lavis_accel.bench.settings import bench_settings
    from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE, build_tiny

    results = {}
    for arch, model_type in [("blip_retrieval", "coco"), ("blip_caption", "base_coco"), ("blip_vqa", "vqav2"),
                             ("blip_nlvr", "nlvr")]:
        model = build_tiny(arch, model_type, is_eval=True)
        settings = bench_settings(["turbo", "crossget"], [4], {"name": "turbo", "threshold": 1})
        options = BenchOptions(parts=("task",), task_batch_size=1, candidates=2, warmup=0, repeats=1)
        results[arch] = run_benchmark(model, settings, options, TINY_IMAGE_SIZE, {"arch": arch, "model_type": model_type})
    with open(sys.argv[1], "w") as handle:  # not stdout: transformers prints there when it sees a new cache
        json.dump(results, handle)
""")


def test_every_task_step_runs_and_counts_on_tiny_models(tmp_path):
    """Each task's inference step (retrieval ITC+ITM, caption beams, VQA rank, NLVR2) on a tiny BLIP model, with
    Turbo and CrossGET, in a process started with the offline hub (transformers must see it at import)."""
    write_offline_hub(str(tmp_path / "hub"))
    env = {**os.environ, **offline_env(str(tmp_path / "hub"))}
    results_path = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-c", TASK_SCRIPT, str(results_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(results_path.read_text())
    for arch, (parent, sdpa, turbo, crossget) in results.items():
        assert REQUIRED_KEYS <= set(parent), arch
        assert parent["task_gflops"] > 0 and parent["params"] > 0 and parent["peak_mem_mb"] > 0, arch
        assert crossget["setting"] == "crossget rv=4 rl=0", arch
        if arch != "blip_caption":  # beam search may stop at another length once tokens are merged
            assert turbo["flops_ratio"] > 1.0 and crossget["flops_ratio"] > 1.0, arch
    nlvr, retrieval = results["blip_nlvr"][0], results["blip_retrieval"][0]
    assert retrieval["params"] < retrieval["params_total"]  # momentum encoders are not used at inference
    assert nlvr["task"].startswith("nlvr2")


def test_other_load_sees_a_busy_neighbour():
    import time

    from lavis_accel.bench.machine import OtherLoad

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this system")
    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    neighbour = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)  # let it start spinning
        with OtherLoad() as load:
            time.sleep(1.0)  # this process does nothing meanwhile
    finally:
        neighbour.kill()
        neighbour.wait()
    assert load.share > 0.3 / os.cpu_count()  # one spinning process takes a whole CPU of the machine's


def test_a_busy_machine_is_reported_once_per_part_and_distrusts_its_speedups(monkeypatch):
    from lavis_accel.bench import runner

    monkeypatch.setattr(runner, "OtherLoad", FixedLoad(0.45))
    settings = bench_settings(["tome"], [4], {"name": "turbo", "threshold": 1})
    options = BenchOptions(parts=("vision",), batch_size=2, warmup=0, repeats=1, device=CPU)
    records = run_benchmark(VisionOnly(), settings, options, 64, {"arch": "tiny", "model_type": "test"})
    assert all(record["vision_speedup_trusted"] is False for record in records)
    assert report.untrusted(records) == [
        "the machine was busy: other processes used 45% of its CPUs while the vision step was timed, so its "
        "speed-ups are not trustworthy (a busy neighbour slows settings unequally)"]


def test_sweep_covers_the_grid_and_plots_speedup_against_flops_ratio(tmp_path):
    from omegaconf import OmegaConf

    from lavis_accel.bench.build import arch_spec
    from lavis_accel.bench.machine import machine_info
    from lavis_accel.bench.sweep import run_sweep, write_sweep_reports
    from lavis_accel.testing.tiny_models import tiny_model_config

    spec = arch_spec("blip_retrieval_turbo", "coco")
    spec.config = OmegaConf.merge(spec.config, tiny_model_config("blip_retrieval", "coco"))
    settings = bench_settings(["tome"], [2], spec.reducer_config)
    options = BenchOptions(warmup=0, repeats=1, device=CPU)
    records = run_sweep(spec, settings, options, [64, 96], [1, 2], {"arch": "tiny", "model_type": "coco"},
                        progress=lambda message: None)
    assert [(r["image_size"], r["batch_size"], r["setting"]) for r in records][:3] == [
        (64, 1, "parent (LAVIS)"), (64, 1, "tome r=0 (SDPA only)"), (64, 1, "tome r=2")]
    assert len(records) == 2 * 2 * 3
    tokens = {r["image_size"]: r["vision_tokens_out"] for r in records if r["role"] == "parent"}
    assert tokens == {64: 17, 96: 37}  # the model was built again at each size
    paths = write_sweep_reports(records, str(tmp_path), machine_info(CPU, torch.float32))
    assert [os.path.basename(path) for path in paths] == ["bench.json", "bench.md", "sweep.png"]
    assert (tmp_path / "bench.md").read_text().count("### ") == 4
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_options_are_checked_in_one_line(capsys):
    assert worker.main(["--arch", "blip_retrieval_turbo", "--model-type", "coco", "--sweep",
                        "--batch-sizes", "0"]) == 2
    assert "--batch-sizes must all be >= 1, got 0" in capsys.readouterr().err


def test_worker_argv_passes_switches_only_when_on():
    import argparse

    from lavis_accel.bench.cli import add_arguments, worker_argv

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    on = worker_argv(parser.parse_args(["--arch", "a", "--model-type", "b", "--sweep", "--image-sizes", "224"]))
    off = worker_argv(parser.parse_args(["--arch", "a", "--model-type", "b"]))
    assert "--sweep" in on and on[on.index("--image-sizes") + 1] == "224"
    assert "--sweep" not in off
