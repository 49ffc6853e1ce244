"""``lavis-accel pformer-demo``: P-Former's effect at toy scale on one CPU, offline, in about eight minutes.

P-Former (BLIText) claims that aligning BLIP-2's Q-Former outputs to the prompts of a P-Former trained on text
alone makes BLIP-2 better when few image-text pairs are available. The demo tests that on synthetic scenes: a small
OPT learns the captions' language from sentences alone and stays frozen; P-Former's stage 0 (``pformer_opt``)
learns, on the same sentences, to write each as prompts that OPT reconstructs it from; then BLIP-2 (tiny EVA ViT,
Q-Former, the frozen OPT) trains its two stages on a few pairs twice with the same seed and steps, without the
alignment (``loss_weight`` 0: stock BLIP-2) and with it (weights 10 and 100). Stock ``blip2_opt`` loads each stage-2
checkpoint and is scored on the same held-out images: OPT's caption loss given the queries, and what its generated
captions name correctly. The table says plainly whether the effect shows.
Everything runs in a child process (``python -m lavis_accel.pformer_demo.worker``) whose environment points
transformers at a local offline hub before transformers is imported.
"""
from lavis_accel.demo import run_offline_worker
from lavis_accel.pformer_demo.settings import PformerDemoSettings, add_arguments  # noqa: F401


def run(args) -> int:
    settings = PformerDemoSettings.from_args(args)
    # one torch thread unless the user sets it (extra_env yields to the environment): these tiny models gain nothing
    # from intra-op threads, and on a shared two-core machine OpenMP's spin-waiting made each step many times slower
    return run_offline_worker("lavis_accel.pformer_demo.worker", settings.argv(), settings.workdir, "pformer-demo",
                              extra_env={"OMP_NUM_THREADS": "1"})
