"""The cost side of the demo's table: counted GFLOPs per image and measured speed-up, with the bench's tools."""
import torch

from lavis_accel.bench.flops import count_flops
from lavis_accel.bench.memory import ParameterUse
from lavis_accel.bench.tasks import StepInputs, retrieval_step, vision_step
from lavis_accel.bench.throughput import Contender, paired_ratio, time_interleaved

TIMED_IMAGES = 32
REPEATS = 7  # rounds: the fewest whose order-statistic interval of a median reaches 95 % (bench.throughput)
MIN_TIME = 0.3  # seconds each measurement lasts at least (a short step is repeated)


def add_costs(rows, models, settings):
    """Add ``params``, ``vision_gflops``, ``task_gflops``, ``vision_speedup`` and ``task_speedup`` (with their 95 %
    intervals, ``*_speedup_ci``) to each row (in place).

    The vision step is the ViT alone; the task step is retrieval of one query image as LAVIS's
    ``compute_sim_matrix`` does it (ITC over the gallery, ITM re-ranking of ``k_test`` candidates). Speed-ups are
    against the ``parent`` row: every setting is timed once per round, interleaved in this process, and a speed-up is
    the median of its per-round ratios to the parent (``bench.throughput.paired_ratio``), so what slows a round
    down cancels. ``params`` are those the task step reads (momentum copies, queues and training-only heads are
    not).
    """
    parent = models["parent"]
    device = next(parent.parameters()).device
    inputs = StepInputs(batch_size=TIMED_IMAGES, image_size=parent.visual_encoder.patch_embed.img_size[0],
                        device=device, candidates=settings.k_test, seed=settings.seed)
    for part, make_step in (("vision", vision_step), ("task", retrieval_step)):
        steps = {name: make_step(model, inputs) for name, model in models.items()}
        with torch.no_grad():
            for row in rows:
                step = steps[row["setting"]]
                row[f"{part}_gflops"] = count_flops(step.run) / step.samples / 1e9
                if part == "task":
                    row["params"] = parameters_read(models[row["setting"]], step)
            contenders = [Contender(name, lambda: None, step.run) for name, step in steps.items()]
            rates = time_interleaved(contenders, TIMED_IMAGES, device, warmup=1, repeats=REPEATS, min_time=MIN_TIME)
        for row in rows:
            ratio = paired_ratio(rates[row["setting"]], rates["parent"])
            row[f"{part}_speedup"], row[f"{part}_speedup_ci"] = ratio.median, [ratio.low, ratio.high]


def parameters_read(model, step) -> int:
    """How many of ``model``'s parameters one run of ``step`` reads."""
    with ParameterUse(model) as use:
        step.run()
    return use.count
