"""Benchmark one model in several settings: counted FLOPs, parameters, peak memory, interleaved throughput.

The model is patched in place from setting to setting, so every setting runs the very same weights in the same
process. A distilled student's bench runs two models instead (the full-size parent and the student, each setting
on its own). Each step is first run once untimed under the FLOP counter and the memory trackers, then all settings
are timed interleaved (see ``throughput.time_interleaved``).
"""
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from lavis.models.vit import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from lavis_accel.bench.flops import ensure_cpu_attention_formula, lavis_vit_flops
from lavis_accel.bench.machine import BUSY_SHARE, OtherLoad
from lavis_accel.bench.memory import ParameterUse, PeakMemory
from lavis_accel.bench.settings import PARENT, SDPA, BenchSetting, CrossGetSettings
from lavis_accel.bench.tasks import Step, StepInputs, task_step, text_step, vision_step
from lavis_accel.bench.throughput import Contender, median_and_spread, paired_ratio, time_interleaved
from lavis_accel.patch import clip as clip_binding
from lavis_accel.patch import is_patched, token_counts
from lavis_accel.patch import med as med_binding
from lavis_accel.patch.crossget import unimodal_text_encoder
from lavis_accel.reduce import crossget
from lavis_accel.reduce.merge import parse_r, token_schedule
from lavis_accel.reduce.settings import ReducerSettings

VISION, TEXT, TASK = "vision", "text", "task"


@dataclass
class BenchOptions:
    parts: Sequence[str] = (VISION, TASK)  # TEXT too to time the text encoder alone
    batch_size: int = 8  # images per vision step, captions per text step
    task_batch_size: int = 1  # samples per task step
    candidates: int = 1  # retrieval k / VQA answer candidates (see tasks.default_candidates)
    warmup: int = 1
    repeats: int = 5
    max_repeats: Optional[int] = None  # more rounds, up to this many, until every speed-up is trusted
    min_time: float = 0.0  # seconds each measurement lasts at least (the step is repeated)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    seed: int = 0


@dataclass
class Profile:
    """One untimed run of a step: FLOPs per sample, peak memory, parameters read, the step's output and the token
    counts per block of the ViT's and of the text encoder's last forward (None when that tower is not patched or its
    last forward was not reduced)."""

    gflops_per_sample: float
    peak_mem_mb: float
    params_used: int
    output: object
    token_counts: Optional[List[int]] = None
    text_token_counts: Optional[List[int]] = None


def stderr_progress(start=None) -> Callable[[str], None]:
    """A progress printer: ``[bench  12.3s] message`` on stderr, flushed at once."""
    start = time.perf_counter() if start is None else start

    def progress(message: str) -> None:
        print(f"[bench {time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

    return progress


def profile_step(model, step: Step, device: torch.device) -> Profile:
    """Run ``step`` once, counting its FLOPs, its peak memory and the parameters it reads."""
    ensure_cpu_attention_formula()
    resident = list(model.parameters()) + list(model.buffers())
    flops, memory, use = FlopCounterMode(display=False), PeakMemory(device, resident), ParameterUse(model)
    with torch.no_grad(), flops, memory, use:
        output = step.run()
    return Profile(
        gflops_per_sample=flops.get_total_flops() / step.samples / 1e9,
        peak_mem_mb=memory.peak_bytes / 2**20,
        params_used=use.count,
        output=output,
        token_counts=vision_token_counts(model),
        text_token_counts=text_token_counts(model),
    )


def vision_token_counts(model) -> Optional[List[int]]:
    """The vision tower's token counts per block in its last forward, or None when it is not patched."""
    if clip_binding.is_clip(model):
        return clip_binding.token_counts(model)["image"] if clip_binding.is_patched(model) else None
    return token_counts(model) if is_patched(model) else None


def text_token_counts(model) -> Optional[List[int]]:
    """The text tower's token counts per block in its last reduced forward (CLIP's text tower, a BLIP model's
    unimodal text pass), or None when it is not patched or that forward was not reduced (a multimodal pass)."""
    if clip_binding.is_clip(model):
        counts = clip_binding.token_counts(model)["text"] if clip_binding.is_patched(model) else None
    else:
        text = unimodal_text_encoder(model)
        counts = med_binding.token_counts(text) if text is not None and med_binding.current_step(text) else None
    return counts or None


def vision_tokens_out(model, profile: Profile) -> int:
    """Tokens leaving the vision tower (CLIP's pools them into one feature: its sequence length is read instead)."""
    if profile.token_counts:
        return profile.token_counts[-1]
    if clip_binding.is_clip(model):
        return model.visual.positional_embedding.shape[0]
    return profile.output.shape[1]


def vision_geometry(model):
    """``(tokens, blocks)`` of the model's image tower: a BLIP ViT's or CLIP's, [CLS] included."""
    if clip_binding.is_clip(model):
        return model.visual.positional_embedding.shape[0], len(model.visual.transformer.resblocks)
    vit = model.visual_encoder
    return vit.patch_embed.num_patches + 1, len(vit.blocks)


def expected_schedule(vit, setting: BenchSetting, geometry=None) -> Optional[List[int]]:
    """Token counts through the ViT that the setting's reducer should produce (constant for the parent); None for
    MADTP, whose counts depend on the inputs. ``geometry``: ``(tokens, blocks)`` (default: the BLIP ``vit``'s).

    CrossGET's counts include its cross token (one more token in) until the last block drops it, as the patched
    towers record them."""
    tokens, depth = geometry or (vit.patch_embed.num_patches + 1, len(vit.blocks))
    if setting.reducer is None:
        return [tokens] * (depth + 1)
    reducer = setting.reducer
    if isinstance(reducer, CrossGetSettings):
        counts = crossget.token_schedule(tokens + 1, reducer.rv, depth)
        return counts[:-1] + [counts[-1] - 1]
    if not isinstance(reducer, ReducerSettings):
        return None
    return token_schedule(tokens, parse_r(depth, reducer.r), reducer.threshold, class_token=True)


def analytic_vision_gflops(vit, setting: BenchSetting) -> Optional[float]:
    """The analytic FLOP model of the setting's token schedule, per image, in GFLOPs (None without a schedule, and
    for CrossGET: the model is that of ToMe's bipartite matching)."""
    schedule = expected_schedule(vit, setting)
    if schedule is None or isinstance(setting.reducer, CrossGetSettings):
        return None
    cls_row = setting.reducer is not None and setting.reducer.alpha > 0
    return lavis_vit_flops(vit, schedule, cls_attention_row=cls_row) / 1e9


def setting_models(model, settings: Sequence[BenchSetting]) -> list:
    """The model each setting runs: ``model`` for all (patched from setting to setting), or, when ``model`` maps
    roles to models (a distilled student's bench: ``{"parent": ..., "student": ...}``), its setting's role's."""
    if not isinstance(model, Mapping):
        return [model] * len(settings)
    missing = sorted({setting.role for setting in settings} - set(model))
    if missing:
        raise ValueError(f"run_benchmark: no model for the role(s) {', '.join(missing)}")
    return [model[setting.role] for setting in settings]


def _distinct(models) -> list:
    """``models`` without repeats, in order (one model patched by every setting appears once)."""
    seen = {}
    for model in models:
        seen.setdefault(id(model), model)
    return list(seen.values())


def setting_steps(models, build: Callable[[object], Step]) -> List[Step]:
    """One step per setting, built once per distinct model: settings that patch one model share its step."""
    built = {id(model): build(model) for model in _distinct(models)}
    return [built[id(model)] for model in models]


def _profile_all(models, settings, steps, device, progress) -> List[Profile]:
    profiles = []
    for model, setting, step in zip(models, settings, steps):
        setting.activate(model)
        profile = profile_step(model, step, device)
        progress(f"{step.description} | {setting.label}: {profile.gflops_per_sample:.2f} GFLOPs/sample, "
                 f"peak {profile.peak_mem_mb:.0f} MB")
        profiles.append(profile)
    return profiles


def _baselines(settings) -> List[BenchSetting]:
    """The settings speed-ups are taken against: the LAVIS parent and the SDPA-only patch (if there is one)."""
    return [setting for setting in settings if setting.role in (PARENT, SDPA)]


def _all_trusted(settings):
    """Whether every setting's speed-up over each baseline has a narrow enough confidence interval."""
    def settled(rates) -> bool:
        return all(paired_ratio(rates[setting.label], rates[base.label]).trusted
                   for base in _baselines(settings) for setting in settings if setting is not base)
    return settled


def _time_all(models, settings, steps, options, progress) -> Dict[str, List[float]]:
    contenders = [
        Contender(setting.label, lambda setting=setting, model=model: setting.activate(model), step.run)
        for model, setting, step in zip(models, settings, steps)
    ]
    progress(f"timing {steps[0].description}: {len(settings)} settings x {options.repeats} rounds "
             f"(up to {options.max_repeats or options.repeats} until speed-ups settle), interleaved")
    with torch.no_grad():
        return time_interleaved(
            contenders, steps[0].samples, options.device, options.warmup, options.repeats, progress=progress,
            min_time=options.min_time, max_repeats=options.max_repeats, settled=_all_trusted(settings),
        )


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _speedup_fields(name, rates, setting, baseline, machine_busy) -> dict:
    if baseline is None:  # no such baseline in this bench (a student's has no SDPA-only patch)
        return {name: None, f"{name}_ci": None, f"{name}_ci_level": None, f"{name}_trusted": None}
    if setting is baseline:  # exactly 1: nothing to estimate
        return {name: 1.0, f"{name}_ci": [1.0, 1.0], f"{name}_ci_level": 1.0, f"{name}_trusted": not machine_busy}
    ratio = paired_ratio(rates[setting.label], rates[baseline.label])
    return {name: ratio.median, f"{name}_ci": [ratio.low, ratio.high], f"{name}_ci_level": ratio.level,
            f"{name}_trusted": ratio.trusted and not machine_busy}


def _part_fields(prefix, profiles, rates, settings, index, other_share) -> dict:
    """Per-part record fields: GFLOPs, throughput, and the speed-ups (median of per-round ratios, with their
    confidence interval; not trusted while other processes kept the machine busy) and FLOPs ratios against the
    parent and the SDPA baseline (None without one)."""
    roles = [setting.role for setting in settings]
    parent, sdpa = roles.index(PARENT), roles.index(SDPA) if SDPA in roles else None
    gflops = [profile.gflops_per_sample for profile in profiles]
    median, spread = median_and_spread(rates[settings[index].label])
    busy = other_share is not None and other_share > BUSY_SHARE
    return {
        f"{prefix}other_cpu_share": other_share,
        f"{prefix}gflops": gflops[index],
        f"{prefix}throughput_median": median,
        f"{prefix}throughput_spread": spread,
        f"{prefix}throughput_runs": rates[settings[index].label],
        **_speedup_fields(f"{prefix}speedup", rates, settings[index], settings[parent], busy),
        f"{prefix}flops_ratio": _ratio(gflops[parent], gflops[index]),
        **_speedup_fields(f"{prefix}speedup_vs_sdpa", rates, settings[index],
                          settings[sdpa] if sdpa is not None else None, busy),
        f"{prefix}flops_ratio_vs_sdpa": _ratio(gflops[sdpa], gflops[index]) if sdpa is not None else None,
    }


def _empty_part_fields(prefix) -> dict:
    keys = ("other_cpu_share", "gflops", "throughput_median", "throughput_spread", "throughput_runs", "speedup", "speedup_ci",
            "speedup_ci_level", "speedup_trusted", "flops_ratio", "speedup_vs_sdpa", "speedup_vs_sdpa_ci",
            "speedup_vs_sdpa_ci_level", "speedup_vs_sdpa_trusted", "flops_ratio_vs_sdpa")
    return {prefix + key: None for key in keys}


def _text_fields(profiles, rates, settings, index, other_shares) -> dict:
    """The text part's fields, its token counts (from the text part, else from the task step, e.g. CLIP's
    retrieval) and the image + caption pair's GFLOPs and FLOPs ratio to the parent's pair."""
    if TEXT in profiles:
        fields = _part_fields("text_", profiles[TEXT], rates[TEXT], settings, index, other_shares[TEXT])
    else:
        fields = _empty_part_fields("text_")
    source = profiles.get(TEXT) or profiles.get(TASK)
    counts = source[index].text_token_counts if source else None
    fields["text_token_counts"] = counts
    fields["text_tokens_out"] = counts[-1] if counts else None
    pairs = None
    if VISION in profiles and TEXT in profiles:
        pairs = [vision.gflops_per_sample + text.gflops_per_sample
                 for vision, text in zip(profiles[VISION], profiles[TEXT])]
    parent = [setting.role for setting in settings].index(PARENT)
    fields["pair_gflops"] = pairs[index] if pairs else None
    fields["pair_flops_ratio"] = _ratio(pairs[parent], pairs[index]) if pairs else None
    return fields


def run_benchmark(
    model,
    settings: Sequence[BenchSetting],
    options: BenchOptions,
    image_size: int,
    identity: dict,
    progress: Callable[[str], None] = lambda message: None,
) -> List[dict]:
    """Measure ``model`` in each setting; return one record per setting (``identity`` keys first). ``model`` may
    map roles to models (see :func:`setting_models`): each setting then runs its role's model.

    Task fields have no prefix (``task_gflops`` aside), vision fields start with ``vision_``, text fields with
    ``text_``; a part not in ``options.parts`` has ``None`` values. Vision GFLOPs are per image, text GFLOPs per
    caption, task GFLOPs per task sample; ``pair_gflops`` (vision and text measured) is one image plus one caption
    through the two encoders, as CrossGET's logs count a model.
    """
    models = setting_models(model, settings)
    for each in _distinct(models):
        each.to(options.device, options.dtype).eval()
    steps = {}
    encoder_inputs = StepInputs(options.batch_size, image_size, options.device, seed=options.seed, dtype=options.dtype)
    if VISION in options.parts:
        steps[VISION] = setting_steps(models, lambda each: vision_step(each, encoder_inputs))
    if TEXT in options.parts:
        steps[TEXT] = setting_steps(models, lambda each: text_step(each, encoder_inputs))
    if TASK in options.parts:
        inputs = StepInputs(options.task_batch_size, image_size, options.device, options.candidates, options.seed,
                            options.dtype)
        steps[TASK] = setting_steps(models, lambda each: task_step(each, inputs))
    profiles = {part: _profile_all(models, settings, part_steps, options.device, progress)
                for part, part_steps in steps.items()}
    rates, other_shares = {}, {}
    for part, part_steps in steps.items():
        with OtherLoad() as load:
            rates[part] = _time_all(models, settings, part_steps, options, progress)
        other_shares[part] = load.share
    for each in _distinct(models):  # each model back in its first setting (the parent's, for one patched model)
        settings[models.index(each)].activate(each)

    records = []
    main_part = next(part for part in (TASK, VISION, TEXT) if part in steps)
    parent_index = [setting.role for setting in settings].index(PARENT)
    for index, setting in enumerate(settings):
        model = models[index]
        vit = getattr(model, "visual_encoder", None)  # a BLIP ViT (CLIP has ``visual``)
        record = dict(identity)
        record.update({
            "setting": setting.label,
            "role": setting.role,
            "model": setting.model,
            "reducer": setting.reducer.name if setting.reducer else "none",
            "r": setting.reducer.r if setting.reducer else 0,
            "rl": getattr(setting.reducer, "rl", None),
            "temperature": getattr(setting.reducer, "temperature", None),
            "reducer_settings": setting.reducer.as_dict() if setting.reducer else None,
            "device": str(options.device),
            "dtype": str(options.dtype).replace("torch.", ""),
            "batch_size": options.batch_size,
            "task_batch_size": options.task_batch_size,
            "task": steps[TASK][index].description if TASK in steps else None,
            "params": profiles[main_part][index].params_used,
            "params_total": sum(p.numel() for p in model.parameters()),
            "params_share": _ratio(profiles[main_part][index].params_used,
                                   profiles[main_part][parent_index].params_used),
            "params_total_share": _ratio(sum(p.numel() for p in model.parameters()),
                                         sum(p.numel() for p in models[parent_index].parameters())),
            "peak_mem_mb": profiles[main_part][index].peak_mem_mb,
        })
        if VISION in steps:
            vision_profile = profiles[VISION][index]
            record.update(_part_fields("vision_", profiles[VISION], rates[VISION], settings, index,
                                       other_shares[VISION]))
            record["vision_tokens_out"] = vision_tokens_out(model, vision_profile)
            record["vision_token_counts"] = vision_profile.token_counts
            if isinstance(vit, VisionTransformer):  # the analytic FLOP model is that of LAVIS's BLIP ViT
                record["vision_gflops_analytic"] = analytic_vision_gflops(vit, setting)
            if isinstance(vit, VisionTransformer) or clip_binding.is_clip(model):
                schedule = expected_schedule(vit, setting, vision_geometry(model))
                record["vision_tokens_expected"] = schedule[-1] if schedule else None
        else:
            record.update(_empty_part_fields("vision_"))
        record.setdefault("vision_gflops_analytic", None)
        record.update(_text_fields(profiles, rates, settings, index, other_shares))
        if TASK in steps:
            task_fields = _part_fields("", profiles[TASK], rates[TASK], settings, index, other_shares[TASK])
            task_fields["task_gflops"] = task_fields.pop("gflops")
            record.update(task_fields)
        else:
            record.update(_empty_part_fields(""))
            record["task_gflops"] = record.pop("gflops")
        records.append(record)
    return records
