"""``lavis-accel bench --compare-dtype D``: the vision step in ``--dtype`` and in ``D``, timed side by side.

Two builds of the model with the same weights (the same seed; a deep copy would not do: fairscale's activation
checkpointing in LAVIS's BLIP keeps weak references to the original blocks), one per precision, run every setting
with the same images (cast to each precision); every
round times each (setting, precision) once, so a speed-up of ``D`` over ``--dtype`` is a median of paired per-round
ratios, as the bench's other speed-ups are. With it, the cosine between the two precisions' pooled outputs (the
[CLS] token of BLIP's ViT, CLIP's image embedding), which says whether ``D`` keeps the model's answer.
"""
from typing import List, Sequence

import torch

from lavis_accel.bench.settings import BenchSetting
from lavis_accel.bench.tasks import StepInputs, vision_step
from lavis_accel.bench.throughput import Contender, paired_ratio, time_interleaved


def pooled(output: torch.Tensor) -> torch.Tensor:
    """A vision step's pooled output, float64: ``[B, T, C]`` tokens give [CLS] (index 0); ``[B, E]`` is pooled."""
    return (output[:, 0] if output.dim() == 3 else output).double()


def compare_precisions(model, twin, settings: Sequence[BenchSetting], options, image_size: int, other: torch.dtype,
                       progress=lambda message: None) -> List[dict]:
    """One record per setting: ``other`` over ``options.dtype`` on the vision step (paired speed-up and its interval)
    and the two precisions' pooled-output cosine. ``model`` (stock, in ``options.dtype``) and ``twin`` (another build
    with the same weights) are the two copies; ``twin`` is cast to ``other``."""
    base_name, other_name = (str(dtype).replace("torch.", "") for dtype in (options.dtype, other))
    copies = {base_name: model, other_name: twin.to(options.device, other).eval()}
    steps = {name: vision_step(copies[name], StepInputs(options.batch_size, image_size, options.device,
                                                         seed=options.seed, dtype=dtype))
             for name, dtype in ((base_name, options.dtype), (other_name, other))}
    contenders = [Contender(f"{setting.label} @ {name}", lambda s=setting, m=copies[name]: s.activate(m),
                            steps[name].run) for setting in settings for name in (base_name, other_name)]
    progress(f"timing {steps[base_name].description} in {base_name} and {other_name}: {len(contenders)} contenders x "
             f"{options.repeats} rounds, interleaved")
    with torch.no_grad():
        rates = time_interleaved(contenders, steps[base_name].samples, options.device, options.warmup,
                                 options.repeats, progress=progress, min_time=options.min_time)
        records = []
        for setting in settings:
            outputs = {}
            for name in (base_name, other_name):
                setting.activate(copies[name])
                outputs[name] = pooled(steps[name].run())
            ratio = paired_ratio(rates[f"{setting.label} @ {other_name}"], rates[f"{setting.label} @ {base_name}"])
            records.append({
                "setting": setting.label,
                "dtype": base_name,
                "compared_dtype": other_name,
                "speedup": ratio.median,
                "speedup_ci": [ratio.low, ratio.high],
                "ci_level": ratio.level,
                "rounds": ratio.rounds,
                "pooled_cosine": torch.nn.functional.cosine_similarity(
                    outputs[base_name], outputs[other_name], dim=-1).min().item(),
            })
    for name in copies:
        settings[0].activate(copies[name])
    return records


def markdown(records: Sequence[dict]) -> str:
    """The comparison as a markdown table (speed-up of the compared precision, its interval, the cosine)."""
    if not records:
        return ""
    first = records[0]
    lines = [f"### {first['compared_dtype']} over {first['dtype']} (vision step, paired rounds)", "",
             f"| setting | {first['compared_dtype']} speed-up | interval | min pooled cosine |", "|---|---|---|---|"]
    for record in records:
        low, high = record["speedup_ci"]
        lines.append(f"| {record['setting']} | {record['speedup']:.3g}x | [{low:.3g}-{high:.3g}] "
                     f"({record['ci_level']:.0%}, {record['rounds']} rounds) | {record['pooled_cosine']:.5f} |")
    return "\n".join(lines) + "\n"
