"""``lavis-accel bench --sweep``: the vision encoder over a grid of image sizes x batch sizes x settings, one run.

Each image size builds the parent again at that size (random weights: its position embeddings simply have the
size's shape); each batch size is one ``run_benchmark`` of the vision part. The plot puts every reduced setting's
speed-up over the SDPA-only patch against its FLOPs ratio over the same baseline, with the ideal line y = x: how
much of the FLOPs it saves a setting turns into time.
"""
import os
from typing import Callable, List, Sequence

from omegaconf import OmegaConf

from lavis_accel.bench.build import ArchSpec, build_parent
from lavis_accel.bench.runner import VISION, BenchOptions, run_benchmark
from lavis_accel.bench.settings import REDUCED


def run_sweep(spec: ArchSpec, settings, options: BenchOptions, image_sizes: Sequence[int],
              batch_sizes: Sequence[int], identity: dict, progress: Callable[[str], None]) -> List[dict]:
    """One record per (image size, batch size, setting), each with ``image_size`` set."""
    records = []
    for image_size in image_sizes:
        sized = ArchSpec(spec.arch, spec.model_type, spec.parent_class,
                         OmegaConf.merge(spec.config, {"image_size": image_size}), spec.reducer_config)
        model = build_parent(sized)
        for batch_size in batch_sizes:
            progress(f"sweep: {image_size} px, batch {batch_size}")
            point = BenchOptions(**{**vars(options), "parts": (VISION,), "batch_size": batch_size})
            for record in run_benchmark(model, settings, point, image_size, identity, progress):
                records.append({**record, "image_size": image_size})
    return records


def write_sweep_plot(records: Sequence[dict], path: str) -> str:
    """Speed-up against FLOPs ratio (both over the SDPA-only patch) of every reduced setting, with y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reduced = [record for record in records if record["role"] == REDUCED]
    figure, axis = plt.subplots(figsize=(6, 5))
    groups = sorted({(record["image_size"], record["batch_size"]) for record in reduced})
    for index, (image_size, batch_size) in enumerate(groups):
        points = [r for r in reduced if (r["image_size"], r["batch_size"]) == (image_size, batch_size)]
        axis.plot([r["vision_flops_ratio_vs_sdpa"] for r in points], [r["vision_speedup_vs_sdpa"] for r in points],
                  "o", color=f"C{index}", label=f"{image_size} px, batch {batch_size}")
        for r in points:
            axis.annotate(r["setting"], (r["vision_flops_ratio_vs_sdpa"], r["vision_speedup_vs_sdpa"]), fontsize=7)
    top = max([1.0] + [max(r["vision_flops_ratio_vs_sdpa"], r["vision_speedup_vs_sdpa"]) for r in reduced]) * 1.05
    axis.plot([1, top], [1, top], color="grey", linestyle="--", label="ideal (speed-up = FLOPs ratio)")
    axis.set_xlabel("FLOPs ratio vs SDPA-only")
    axis.set_ylabel("speed-up vs SDPA-only")
    first = records[0]
    axis.set_title(f"{first['arch']} / {first['model_type']}: vision encoder on {first['device']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_sweep_reports(records: Sequence[dict], out_dir: str, machine: dict) -> List[str]:
    """``bench.json`` (all points), ``bench.md`` (one table per image size and batch) and ``sweep.png``."""
    from lavis_accel.bench.report import markdown_table, write_json

    os.makedirs(out_dir, exist_ok=True)
    tables = []
    for image_size, batch_size in sorted({(r["image_size"], r["batch_size"]) for r in records}):
        group = [r for r in records if (r["image_size"], r["batch_size"]) == (image_size, batch_size)]
        tables.append(f"### {image_size} px, batch {batch_size}\n\n" + markdown_table(group))
    markdown = os.path.join(out_dir, "bench.md")
    with open(markdown, "w", encoding="utf-8") as handle:
        handle.write("\n".join(tables))
    return [write_json(records, os.path.join(out_dir, "bench.json"), machine), markdown,
            write_sweep_plot(records, os.path.join(out_dir, "sweep.png"))]
