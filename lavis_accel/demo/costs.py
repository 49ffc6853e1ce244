"""The cost side of the demo's table: counted GFLOPs per image and measured speed-up, with the bench's tools."""
import torch

from lavis_accel.bench.flops import count_flops
from lavis_accel.bench.memory import ParameterUse
from lavis_accel.bench.tasks import StepInputs, retrieval_step, vision_step
from lavis_accel.bench.throughput import Contender, median_and_spread, time_interleaved

TIMED_IMAGES = 32
REPEATS = 7


def add_costs(rows, models, settings):
    """Add ``params``, ``vision_gflops``, ``task_gflops``, ``vision_speedup`` and ``task_speedup`` to each row (in
    place).

    The vision step is the ViT alone; the task step is retrieval of one query image as LAVIS's
    ``compute_sim_matrix`` does it (ITC over the gallery, ITM re-ranking of ``k_test`` candidates). Speed-ups are
    against the ``parent`` row, from medians of steps timed interleaved in this process. ``params`` are those the
    task step reads (momentum copies, queues and training-only heads are not).
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
            rates = time_interleaved(contenders, TIMED_IMAGES, device, warmup=1, repeats=REPEATS)
        medians = {name: median_and_spread(values)[0] for name, values in rates.items()}
        for row in rows:
            row[f"{part}_speedup"] = medians[row["setting"]] / medians["parent"]


def parameters_read(model, step) -> int:
    """How many of ``model``'s parameters one run of ``step`` reads."""
    with ParameterUse(model) as use:
        step.run()
    return use.count
