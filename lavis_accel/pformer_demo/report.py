"""The P-Former demo's outputs: one printed table with a plain verdict, ``results.json`` and ``results.md``."""
import dataclasses
import json
import os

from lavis_accel.pformer_demo.project import BASELINE, PFORMER

MILLION = 1e6
COLUMNS = (
    ("run", "run", "{}"), ("params", "params (M)", "{:.2f}"), ("trained_params", "trained (M)", "{:.2f}"),
    ("pairs", "pairs", "{}"), ("caption_loss", "held-out caption loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3f}"), ("thing_f1", "colour+shape F1", "{:.1f}"),
    ("thing_recall", "recall", "{:.1f}"), ("thing_precision", "precision", "{:.1f}"),
    ("exact_scene", "exact scene", "{:.1f}"), ("image_gain", "image gain", "{:+.4f}"),
)
RUN_TITLES = {BASELINE: "BLIP-2 (loss_weight 0)", PFORMER: "BLIP-2 + P-Former alignment"}


def _shown(row, key):
    value = row[key]
    return RUN_TITLES.get(value, value) if key == "run" else value / MILLION if key.endswith("params") else value


def table(rows):
    """A markdown table of the runs: parameters, pairs, held-out caption loss (lower is better) and what the
    generated captions get right (higher is better)."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(_shown(row, key)) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def verdict(rows, difference, standard_error, text_only):
    """One plain sentence per measure on whether P-Former's run beat the baseline, whether the runs use the image
    at all (their caption loss against the frozen OPT's without any image, ``text_only``), and an overall line."""
    base, aligned = ({row["run"]: row for row in rows}[name] for name in (BASELINE, PFORMER))
    lower_loss = aligned["caption_loss"] < base["caption_loss"]
    better_f1 = aligned["thing_f1"] > base["thing_f1"]
    not_worse_exact = aligned["exact_scene"] >= base["exact_scene"]
    within_noise = abs(difference) < 2 * standard_error
    lines = [
        f"held-out caption loss: P-Former {aligned['caption_loss']:.4f} vs baseline {base['caption_loss']:.4f} "
        f"(difference {difference:+.4f} +- {standard_error:.4f}, paired standard error over the held-out images"
        f"{': within 2 s.e., not a clear difference' if within_noise else ''})",
        f"colour+shape F1 of generated captions: P-Former {aligned['thing_f1']:.1f} vs baseline "
        f"{base['thing_f1']:.1f}; exact scene {aligned['exact_scene']:.1f} vs {base['exact_scene']:.1f}",
    ]
    users = [RUN_TITLES[row["run"]] for row in (base, aligned) if row["image_gain"] > 0.01]
    lines.append(f"image use: the same captions after another held-out image's queries cost "
                 f"{base['image_gain']:+.4f} (baseline) and {aligned['image_gain']:+.4f} (P-Former) nats per token "
                 f"more; " + (f"{' and '.join(users)} pass on what the image shows" if users else
                              "neither run passes on much of what the image shows") +
                 f" (the frozen OPT alone, with no queries, scores {text_only:.4f})")
    if lower_loss and better_f1 and not_worse_exact and not within_noise:
        overall = "the effect shows at this size: P-Former's alignment gave a lower held-out caption loss and better "
        overall += "captions than the same BLIP-2 trained without it"
    elif not lower_loss and not better_f1:
        overall = "the effect does NOT show at this size: the baseline was as good or better on both measures"
    else:
        overall = "the effect does NOT show clearly at this size: the measures disagree or the loss difference is "
        overall += "within the held-out noise"
    return lines + [overall + " (one training seed)."]


def write(rows, lines, settings, extra):
    """Write ``results.json`` (settings, rows, verdict and ``extra``) and ``results.md`` under the workdir."""
    json_path = os.path.join(settings.workdir, "results.json")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump({"settings": dataclasses.asdict(settings), "rows": rows, "verdict": lines, **extra}, handle,
                  indent=2)
    md_path = os.path.join(settings.workdir, "results.md")
    with open(md_path, "w", encoding="utf-8") as handle:
        handle.write(f"# P-Former at toy scale: {settings.pairs} image-text pairs, {settings.held_out} held-out "
                     f"images, {settings.sentences} sentences\n\n")
        handle.write(table(rows) + "\n\n" + "".join(f"- {line}\n" for line in lines))
    return [json_path, md_path]
