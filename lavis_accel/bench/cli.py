"""``lavis-accel bench``: FLOPs, throughput and memory of an accelerated arch against its LAVIS parent.

``run(args)`` measures in a child process (``python -m lavis_accel.bench.worker``) whose environment points
transformers at a local offline hub (``lavis_accel.testing.hub``: a stand-in bert-base-uncased tokenizer and
model) before transformers is imported (it reads the HF variables at import), so nothing is downloaded. Progress goes to stderr as it happens; the table goes to stdout at the end.
"""
import argparse
import os
import subprocess
import sys
import tempfile

OPTIONS = ("arch", "model_type", "reducer", "r", "rl", "temperature", "batch_size", "task_batch_size", "candidates",
           "parts", "warmup", "repeats", "max_repeats", "min_time", "threads", "device", "dtype", "compare_dtype", "seed", "out", "sweep",
           "image_sizes", "batch_sizes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, help="a registered arch, e.g. blip_retrieval_turbo")
    parser.add_argument("--model-type", required=True, help="one of the arch's model types, e.g. coco")
    parser.add_argument("--reducer", nargs="+", metavar="NAME",
                        help="reducers to compare (default: the arch's reducer: block), e.g. tome turbo, madtp or "
                             "crossget")
    parser.add_argument("--r", nargs="+", type=int, metavar="R",
                        help="tokens merged per block, one setting each (default: the arch's r); crossget: per "
                             "image block (its rv)")
    parser.add_argument("--rl", nargs="+", type=int, metavar="RL",
                        help="crossget: tokens merged per text block, one setting per rv x rl (default: the arch's "
                             "rl, else 0)")
    parser.add_argument("--temperature", nargs="+", type=float, metavar="TAU",
                        help="madtp: temperatures, one setting each (default: the arch's reducer temperature)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per timed vision-encoder step")
    parser.add_argument("--task-batch-size", type=int, default=1, help="samples per timed task step")
    parser.add_argument("--candidates", type=int,
                        help="retrieval: texts re-ranked by ITM per image (LAVIS: 256); VQA: answer candidates (128)")
    parser.add_argument("--parts", nargs="+", choices=("vision", "text", "task"), default=["vision", "task"],
                        help="what to measure: the vision encoder alone, the text encoder alone (CLIP's text tower, "
                             "BLIP retrieval's unimodal text pass; per caption) and/or the task's whole inference "
                             "step")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per setting before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each times every setting once)")
    parser.add_argument("--max-repeats", type=int,
                        help="more rounds, up to this many, while a speed-up's 95%% interval is wider than +-5%% "
                             "(default: 3 x --repeats)")
    parser.add_argument("--min-time", type=float, default=0.0,
                        help="seconds each timed measurement lasts at least (a short step is repeated)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="the dtype the model is cast to (and its inputs)")
    parser.add_argument("--compare-dtype", choices=("fp32", "bf16", "fp16"),
                        help="also time the vision step with the model in this dtype, side by side with --dtype "
                             "(paired speed-ups, pooled-output cosine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and synthetic inputs")
    parser.add_argument("--out", help="output directory (default: output/bench/<arch>_<model_type>)")
    parser.add_argument("--sweep", action="store_true",
                        help="time the vision encoder over --image-sizes x --batch-sizes x the settings, and plot "
                             "speed-up against FLOPs ratio (sweep.png)")
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[224, 384, 480], metavar="PX",
                        help="--sweep: image sizes (the model is built again at each)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], metavar="N",
                        help="--sweep: batch sizes")


def worker_argv(args) -> list:
    """``args`` as command-line options for the worker process."""
    argv = []
    for name in OPTIONS:
        value = getattr(args, name, None)
        if value is None or value is False:
            continue
        if value is True:
            argv.append("--" + name.replace("_", "-"))
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += ["--" + name.replace("_", "-")] + [str(item) for item in values]
    return argv


def run(args) -> int:
    """Run the benchmark in a child process with the offline tokenizer environment; returns its exit status."""
    from lavis_accel.testing.hub import offline_env, write_offline_hub

    with tempfile.TemporaryDirectory(prefix="lavis_accel_bench_") as root:
        # bert-base's real vocabulary and size: embedding, LM-head and any by-name BERT load cost what they really do
        write_offline_hub(root, bert_size="base")
        env = {**os.environ, **offline_env(root)}
        command = [sys.executable, "-m", "lavis_accel.bench.worker"] + worker_argv(args)
        return subprocess.run(command, env=env).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lavis_accel.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
