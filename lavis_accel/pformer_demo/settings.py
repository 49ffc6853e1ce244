"""The P-Former demo's knobs, with defaults that fit in about eight minutes on two CPU cores."""
import argparse
from dataclasses import dataclass, fields

from lavis_accel.demo.settings import given_values, settings_argv
from lavis_accel.errors import SettingError
from lavis_accel.models.vit_types import vit_type_size
from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE

# the longest synthetic caption is 31 BERT tokens with [CLS] and [SEP]: 32 prompts read every caption whole
DEFAULT_QUERIES = 32
PATCH_SIZE = vit_type_size("tiny")["patch_size"]


@dataclass(frozen=True)
class PformerDemoSettings:
    workdir: str = "output/pformer_demo"
    pairs: int = 128
    held_out: int = 100
    sentences: int = 4000
    image_size: int = TINY_IMAGE_SIZE
    queries: int = DEFAULT_QUERIES
    llm_steps: int = 200
    llm_lr: float = 2e-3
    stage0_epochs: int = 3
    stage0_lr: float = 5e-4
    stage1_epochs: int = 6
    stage2_epochs: int = 10
    lr: float = 5e-4
    batch_size: int = 16
    stage1_weight: float = 10.0
    stage2_weight: float = 100.0
    max_caption_tokens: int = 40
    seed: int = 42

    @classmethod
    def from_args(cls, args):
        return cls(**given_values(cls, args)).check()

    def check(self):
        """Refuse, in one line, settings the demo cannot run or compare with."""
        for name in ("pairs", "held_out", "sentences", "queries", "llm_steps", "stage0_epochs", "stage1_epochs",
                     "stage2_epochs", "batch_size", "max_caption_tokens"):
            if getattr(self, name) < 1:
                raise SettingError(f"pformer-demo --{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("llm_lr", "stage0_lr", "lr", "stage1_weight", "stage2_weight"):
            if not getattr(self, name) > 0:
                raise SettingError(f"pformer-demo --{_flag(name)} must be positive, got {getattr(self, name)}")
        if self.batch_size > self.pairs:
            raise SettingError(f"pformer-demo --batch-size ({self.batch_size}) must not exceed --pairs ({self.pairs}): "
                               "LAVIS's runner drops the last incomplete batch, so no step would train")
        if self.batch_size > self.sentences:
            raise SettingError(f"pformer-demo --batch-size ({self.batch_size}) must not exceed --sentences "
                               f"({self.sentences})")
        if self.image_size < 3 * PATCH_SIZE or self.image_size % PATCH_SIZE:
            raise SettingError(f"pformer-demo --image-size must be a multiple of the ViT's patch ({PATCH_SIZE} px) "
                               f"of at least {3 * PATCH_SIZE}, got {self.image_size}")
        return self

    def argv(self):
        """These settings as command-line options (for the worker process)."""
        return settings_argv(self)


def _flag(name):
    return name.replace("_", "-")


HELP = {
    "workdir": "where data, the toy LLM, checkpoints and results go",
    "pairs": "image-text pairs BLIP-2 trains on (one caption per image)",
    "held_out": "held-out images both runs are scored on (five captions each)",
    "sentences": "text-only sentences the toy LLM and the P-Former learn from",
    "image_size": "image size in pixels",
    "queries": "Q-Former queries = P-Former prompts = max_txt_len",
    "llm_steps": "training steps of the toy OPT on documents of captions (batch 32)",
    "llm_lr": "learning rate of the toy OPT",
    "stage0_epochs": "epochs of P-Former stage 0 on the sentences",
    "stage0_lr": "learning rate of stage 0",
    "stage1_epochs": "epochs of BLIP-2 stage 1 (each run)",
    "stage2_epochs": "epochs of BLIP-2 stage 2 (each run)",
    "lr": "learning rate of stages 1 and 2",
    "batch_size": "batch size of stages 0, 1 and 2",
    "stage1_weight": "the P-Former run's alignment weight in stage 1 (the paper's 10)",
    "stage2_weight": "the P-Former run's alignment weight in stage 2 (the paper's 100)",
    "max_caption_tokens": "most tokens of a generated caption",
    "seed": "seed of data and training (both runs use the same)",
}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    default = PformerDemoSettings()
    for f in fields(PformerDemoSettings):
        kind = str if f.name == "workdir" else type(getattr(default, f.name))
        parser.add_argument("--" + _flag(f.name), type=kind,
                            help=f"{HELP[f.name]} (default: {getattr(default, f.name)})")
    return parser
