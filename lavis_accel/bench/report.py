"""Write a benchmark's records as JSON, a markdown table and a PNG plot of speed-up and FLOPs ratio against r (a
distilled student's: bars of its speed-up, FLOPs ratio and parameter ratio over its full-size parent)."""
import json
import os
from typing import List, Optional, Sequence

from lavis_accel.bench.machine import BUSY_SHARE
from lavis_accel.bench.precision import markdown as precision_markdown
from lavis_accel.bench.settings import PARENT, SDPA, STUDENT
from lavis_accel.bench.throughput import CONFIDENCE, TRUSTED_HALF_WIDTH

PARTS = (("vision_", "vision encoder (per image)"), ("text_", "text encoder (per caption)"),
         ("", "task step (per sample)"))
TIMED_PARTS = (("vision_", "vision"), ("text_", "text"), ("", "task"))


def _busy_warning(record, prefix, part):
    share = record.get(f"{prefix}other_cpu_share")
    if share is None or share <= BUSY_SHARE:
        return None
    return (f"the machine was busy: other processes used {share:.0%} of its CPUs while the {part} step was timed, "
            f"so its speed-ups are not trustworthy (a busy neighbour slows settings unequally)")


def untrusted(records: Sequence[dict]) -> List[str]:
    """The warnings of a run: a busy machine (once per part), then each speed-up whose confidence interval is too
    wide (or whose rounds too few) to trust."""
    warnings, busy = [], set()
    for prefix, part in TIMED_PARTS:
        warning = _busy_warning(records[0], prefix, part) if records else None
        if warning:
            warnings.append(warning)
            busy.add(prefix)
    for record in records:
        for prefix, part in TIMED_PARTS:
            for suffix, against in (("speedup", "parent"), ("speedup_vs_sdpa", "SDPA")):
                key = prefix + suffix
                if record.get(f"{key}_trusted") is False and prefix not in busy:
                    low, high, rounds = *record[f"{key}_ci"], len(record[prefix + "throughput_runs"])
                    level = record[f"{key}_ci_level"]
                    why = (f"{rounds} rounds are too few for a {CONFIDENCE:.0%} interval (--repeats 6 or more)"
                           if level < CONFIDENCE else f"its {level:.0%} interval {low:.3g}-{high:.3g} over {rounds} "
                           f"rounds is wider than +-{TRUSTED_HALF_WIDTH:.0%} (a noisy machine? more --max-repeats "
                           f"or --min-time)")
                    warnings.append(f"{record['setting']}: {part} speed-up vs {against} {record[key]:.3g}x is not "
                                    f"trustworthy: {why}")
    return warnings


def write_json(records: Sequence[dict], path: str, machine: Optional[dict] = None,
               precision: Optional[Sequence[dict]] = None) -> str:
    """``{"machine": ..., "warnings": [...], "records": [...]}``, plus ``"precision": [...]`` (``--compare-dtype``)."""
    report = {"machine": machine or {}, "warnings": untrusted(records), "records": list(records)}
    if precision is not None:
        report["precision"] = list(precision)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    return path


def _fmt(value, digits=3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _speedup(record, key) -> str:
    """``1.84x [1.80-1.88]``: the median paired speed-up, its confidence interval, and a mark when not trusted."""
    value = record.get(key)
    if value is None:
        return "–"
    low, high = record[f"{key}_ci"]
    mark = "" if record[f"{key}_trusted"] else " ⚠"
    return f"{value:.3g}x [{low:.3g}-{high:.3g}]{mark}"


def _throughput(record, prefix) -> str:
    median = record[f"{prefix}throughput_median"]
    if median is None:
        return "–"
    return f"{median:.3g} ± {record[f'{prefix}throughput_spread'] / 2:.2g}"


TEXT_COLUMNS = ("text GFLOPs", "text tokens out", "text captions/s", "text speed-up", "text FLOPs ratio",
                "image+text GFLOPs (x parent)")


def _text_cells(record) -> List[str]:
    """The text part's cells: GFLOPs per caption, tokens out, throughput, speed-up, FLOPs ratio, and one image plus
    one caption through both encoders (CrossGET's count) with its share of the parent's."""
    pair, ratio = record.get("pair_gflops"), record.get("pair_flops_ratio")
    share = f" ({1 / ratio:.0%})" if pair is not None and ratio else ""
    return [_fmt(record["text_gflops"], 4), _fmt(record.get("text_tokens_out")), _throughput(record, "text_"),
            _speedup(record, "text_speedup"), _fmt(record["text_flops_ratio"]), _fmt(pair, 4) + share]


def _params_cell(record) -> str:
    """Parameters the step reads, in millions; a student's with its share of its parent's."""
    cell = f"{record['params'] / 1e6:.1f}"
    share = record.get("params_share")
    return cell + (f" ({share:.0%})" if record.get("role") == STUDENT and share is not None else "")


def _student_note(first) -> str:
    """The header sentence of a distilled student's bench: what it is compared with."""
    if "parent_arch" not in first:
        return ""
    return (f" The student {first['arch']} / {first['model_type']} is compared with LAVIS's {first['parent_arch']}"
            f" / {first['parent_model_type']} at its full size, both stock (no reducer, so no SDPA row), random"
            " weights, the same inputs; params: those the step reads (momentum copies and queues are not), with the"
            " student's share of the parent's.")


def markdown_table(records: Sequence[dict]) -> str:
    """A header naming model, device and task, then one row per setting (text columns when the text encoder was
    measured)."""
    first = records[0]
    text = first.get("text_gflops") is not None
    text_note = f" Text step: {first['batch_size']} captions." if text else ""
    header = ["setting", "vision GFLOPs (analytic)", "tokens out", "vision im/s", "vision speed-up",
              "vision FLOPs ratio", "vision speed-up vs SDPA", *(TEXT_COLUMNS if text else ()), "task GFLOPs",
              "task samples/s", "speed-up", "FLOPs ratio", "speed-up vs SDPA", "FLOPs ratio vs SDPA", "params (M)",
              "peak MB"]
    lines = [
        f"## {first['arch']} / {first['model_type']} on {first['device']} ({first.get('dtype', 'float32')})",
        "",
        f"Vision step: batch {first['batch_size']}.{text_note} Task step: {first['task'] or 'not measured'}"
        f" (batch {first['task_batch_size']}). Throughput: median ± half the interquartile range of interleaved"
        " rounds. Speed-up: median of per-round ratios to the LAVIS parent timed in the same round, [its"
        " confidence interval], ⚠ when too wide to trust; \"vs SDPA\" against the plugin's patch merging nothing"
        " (r=0), which isolates the reduction's own gain. FLOPs ratio: counted GFLOPs of the baseline over the"
        " setting's." + _student_note(first),
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    for record in records:
        vision = f"{_fmt(record['vision_gflops'], 4)} ({_fmt(record['vision_gflops_analytic'], 4)})"
        cells = [
            record["setting"], vision, _fmt(record.get("vision_tokens_out")), _throughput(record, "vision_"),
            _speedup(record, "vision_speedup"), _fmt(record["vision_flops_ratio"]),
            _speedup(record, "vision_speedup_vs_sdpa"), *(_text_cells(record) if text else ()),
            _fmt(record["task_gflops"], 4), _throughput(record, ""),
            _speedup(record, "speedup"), _fmt(record["flops_ratio"]), _speedup(record, "speedup_vs_sdpa"),
            _fmt(record["flops_ratio_vs_sdpa"]),
            _params_cell(record), f"{record['peak_mem_mb']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"⚠ {warning}" for warning in untrusted(records)]
    return "\n".join(lines) + "\n"


def write_markdown(records: Sequence[dict], path: str, precision: Optional[Sequence[dict]] = None) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(markdown_table(records))
        if precision:
            handle.write("\n" + precision_markdown(precision))
    return path


def _curve_name(record) -> str:
    """A plot curve per reducer, and per text merge count for CrossGET (its x axis is the image's rv)."""
    rl = record.get("rl")
    return record["reducer"] + (f" rl={rl}" if rl else "")


def _curves(records: Sequence[dict], prefix: str):
    """Per reducer (CrossGET: per rl): the points (r, speed-up, FLOPs ratio), starting from the SDPA baseline at
    r = 0 (not for a CrossGET curve with rl > 0: the baseline merges no text)."""
    sdpa = next(record for record in records if record["role"] == SDPA)
    curves = {}
    for record in records:
        if record["role"] == PARENT or not isinstance(record["r"], int):
            continue
        name = _curve_name(record)
        points = curves.setdefault(name, [])
        if record["role"] != SDPA and not points and _curve_name(sdpa) != name and not record.get("rl"):
            points.append(sdpa)
        points.append(record)
    return {
        name: sorted((p["r"], p[f"{prefix}speedup"], p[f"{prefix}flops_ratio"]) for p in points)
        for name, points in curves.items()
    }


def _student_panel(axis, records, prefix, title) -> None:
    """Bars of each student's speed-up (with its interval), FLOPs ratio and parameter ratio over the parent."""
    students = [record for record in records if record["role"] == STUDENT]
    width = 0.8 / max(1, len(students))
    names = ("speed-up", "FLOPs ratio", "params ratio")
    for index, record in enumerate(students):
        speedup = record[f"{prefix}speedup"]
        low, high = record[f"{prefix}speedup_ci"]
        share = record.get("params_share")
        values = [speedup, record[f"{prefix}flops_ratio"], 1 / share if share else 0.0]
        errors = [[speedup - low, 0, 0], [high - speedup, 0, 0]]
        positions = [slot + (index - (len(students) - 1) / 2) * width for slot in range(len(names))]
        axis.bar(positions, values, width, yerr=errors, capsize=4, color=f"C{index}", label=record["setting"])
    axis.set_xticks(range(len(names)))
    axis.set_xticklabels(names)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_title(title)
    axis.set_ylabel("x " + next(record["setting"] for record in records if record["role"] == PARENT))
    axis.legend()


def _reducer_panel(axis, records, prefix, title) -> None:
    """Speed-up (solid) and FLOPs ratio (dashed) against r, one curve pair per reducer."""
    for index, (name, points) in enumerate(_curves(records, prefix).items()):
        r_values = [point[0] for point in points]
        colour = f"C{index}"
        axis.plot(r_values, [point[1] for point in points], "o-", color=colour, label=f"{name} speed-up")
        axis.plot(r_values, [point[2] for point in points], "s--", color=colour, label=f"{name} FLOPs ratio")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_title(title)
    axis.set_xlabel("r (tokens merged per block; crossget: per image block, rv)")
    axis.set_ylabel("x parent (LAVIS)")
    axis.legend()


def write_plot(records: Sequence[dict], path: str) -> Optional[str]:
    """One panel per measured part: speed-up and FLOPs ratio against r (a student's bench: bars of its ratios to
    the parent); ``None`` if no part was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [(prefix, title) for prefix, title in PARTS if records[0].get(f"{prefix}flops_ratio") is not None]
    if not parts:
        return None
    panel = _student_panel if any(record["role"] == STUDENT for record in records) else _reducer_panel
    figure, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for axis, (prefix, title) in zip(axes[0], parts):
        panel(axis, records, prefix, title)
    first = records[0]
    figure.suptitle(f"{first['arch']} / {first['model_type']} on {first['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_reports(records: Sequence[dict], out_dir: str, machine: Optional[dict] = None,
                  precision: Optional[Sequence[dict]] = None) -> List[str]:
    """``bench.json``, ``bench.md`` and ``bench.png`` (when a part was timed) in ``out_dir``; returns the paths.
    ``precision``: the ``--compare-dtype`` records, in both reports."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [
        write_json(records, os.path.join(out_dir, "bench.json"), machine, precision),
        write_markdown(records, os.path.join(out_dir, "bench.md"), precision),
        write_plot(records, os.path.join(out_dir, "bench.png")),
    ]
    return [path for path in paths if path is not None]
