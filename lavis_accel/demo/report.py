"""The demo's outputs: one printed table, ``results.json`` and a plot of recall against measured speed-up and
counted GFLOPs."""
import dataclasses
import json
import os

MILLION = 1e6
COLUMNS = (
    ("setting", "setting", "{}"), ("params", "params (M)", "{:.2f}"),
    ("txt_r1", "txt R@1", "{:.1f}"), ("txt_r5", "R@5", "{:.1f}"), ("txt_r10", "R@10", "{:.1f}"),
    ("img_r1", "img R@1", "{:.1f}"), ("img_r5", "R@5", "{:.1f}"), ("img_r10", "R@10", "{:.1f}"),
    ("r_mean", "mean R", "{:.1f}"),
    ("vision_gflops", "ViT GFLOPs", "{:.4f}"), ("vision_speedup", "ViT speed-up", "{:.2f}x"),
    ("task_gflops", "retrieval GFLOPs", "{:.4f}"), ("task_speedup", "retrieval speed-up", "{:.2f}x"),
)


def _shown(row, key):
    return row[key] / MILLION if key == "params" else row[key]


def table(rows):
    """A markdown table of recall (LAVIS's retrieval metrics, test split) next to counted cost and speed-up."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(_shown(row, key)) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def _draw(ax, rows, x_key):
    """Mean recall against ``x_key`` for every setting: ToMe and Turbo as lines over r from the parent, the other
    methods as single points."""
    parent = next(row for row in rows if row["setting"] == "parent")
    annotated = set()  # each r once: the merging methods share their r values
    for method, marker in (("tome", "s"), ("turbo", "o"), ("turbo_scaled", "v")):
        points = [parent] + [row for row in rows if row["method"] == method]
        if len(points) == 1:  # not among the demo's --methods
            continue
        label = "turbo, alpha scaled to tokens" if method == "turbo_scaled" else method
        ax.plot([p[x_key] for p in points], [p["r_mean"] for p in points], marker=marker, label=label)
        for p in points[1:]:
            if p["r"] not in annotated:
                ax.annotate(f"r={p['r']}", (p[x_key], p["r_mean"]), fontsize=7)
                annotated.add(p["r"])
    for p in (row for row in rows if row["method"] == "madtp"):
        ax.plot([p[x_key]], [p["r_mean"]], marker="^", linestyle="none", label=f"madtp ({p['setting']})")
        ax.annotate(f"tau={p['temperature']:.2g}", (p[x_key], p["r_mean"]), fontsize=7)
    for p in (row for row in rows if row["method"] == "crossget"):
        ax.plot([p[x_key]], [p["r_mean"]], marker="D", linestyle="none", label=f"crossget ({p['setting']})")
        ax.annotate(f"rv={p['r']}", (p[x_key], p["r_mean"]), fontsize=7)
    for p in (row for row in rows if row["method"] == "dlip"):
        label = "dlip, distilled" if p["distilled"] else "dlip, task losses only"
        ax.plot([p[x_key]], [p["r_mean"]], marker="*" if p["distilled"] else "x", markersize=9,
                linestyle="none", label=f"{label} ({p['params'] / MILLION:.2f} M params)")
    ax.grid(alpha=0.3)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_speed, by_flops) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    _draw(by_speed, rows, "vision_speedup")
    by_speed.axvline(1.0, color="grey", linewidth=0.8)
    by_speed.set_xlabel("ViT speed-up over the parent (measured)")
    by_speed.set_ylabel("mean recall (R@1/5/10, both directions)")
    _draw(by_flops, rows, "vision_gflops")
    by_flops.set_xlabel("ViT GFLOPs per image (counted)")
    by_flops.legend(fontsize=7)
    fig.suptitle("Small BLIP retrieval on synthetic scenes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(rows, settings, checkpoint):
    """Write ``results.json``, ``results.md`` and ``recall_vs_speedup.png`` into the workdir; return their paths."""
    out = settings.workdir
    json_path = os.path.join(out, "results.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"checkpoint": checkpoint, "settings": dataclasses.asdict(settings), "results": rows}, f, indent=2,
                  default=str)
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(table(rows) + "\n")
    return [json_path, md_path, _plot(rows, os.path.join(out, "recall_vs_speedup.png"))]
