"""The demo's knobs, with defaults that fit in under half an hour on two CPU cores."""
import argparse
import os
from dataclasses import dataclass, fields
from typing import Tuple

from lavis_accel.errors import SettingError
from lavis_accel.demo.project import DEMO_PATCH_SIZE
from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE

METHODS = ("tome", "turbo", "madtp", "crossget", "dlip")  # the table's methods, in its order


@dataclass(frozen=True)
class DemoSettings:
    workdir: str = "output/demo"
    n_train: int = 1000
    n_val: int = 100
    n_test: int = 100
    epochs: int = 4
    batch_size: int = 16
    k_test: int = 10
    r_values: Tuple[int, ...] = (16, 24, 32)
    madtp_p: float = 0.3
    madtp_epochs: int = 1
    crossget_rv: int = 24
    crossget_epochs: int = 1
    dlip_epochs: int = 1
    methods: Tuple[str, ...] = METHODS
    seed: int = 42

    @classmethod
    def from_args(cls, args):
        values = given_values(cls, args)
        for name in ("r_values", "methods"):
            if name in values:
                values[name] = tuple(values[name])
        settings = cls(**values)
        settings.check()
        return settings

    def check(self):
        for name in ("n_train", "n_val", "n_test", "epochs", "batch_size", "k_test"):
            if getattr(self, name) < 1:
                raise SettingError(f"demo --{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.k_test > self.n_test:
            raise SettingError(f"demo --k-test ({self.k_test}) must not exceed --n-test ({self.n_test})")
        if self.batch_size > self.n_train:
            raise SettingError(f"demo --batch-size ({self.batch_size}) must not exceed --n-train ({self.n_train})")
        if any(r < 1 for r in self.r_values):
            raise SettingError(f"demo --r-values must be positive, got {list(self.r_values)}")
        if not 0 < self.madtp_p < 1:
            raise SettingError(f"demo --madtp-p must be in (0, 1) (the share of GFLOPs to remove), got {self.madtp_p}")
        if self.madtp_epochs < 1:
            raise SettingError(f"demo --madtp-epochs must be at least 1, got {self.madtp_epochs}")
        if self.crossget_epochs < 1:
            raise SettingError(f"demo --crossget-epochs must be at least 1, got {self.crossget_epochs}")
        if self.dlip_epochs < 1:
            raise SettingError(f"demo --dlip-epochs must be at least 1, got {self.dlip_epochs}")
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown or not self.methods:
            raise SettingError(f"demo --methods: {'unknown ' + repr(unknown[0]) if unknown else 'none given'}; "
                               f"choose from {' '.join(METHODS)}")
        limit = crossget_rv_limit()
        if not 1 <= self.crossget_rv <= limit:
            raise SettingError(f"demo --crossget-rv must be from 1 to {limit} (half the demo ViT's patch tokens), "
                               f"got {self.crossget_rv}")
        return self

    def argv(self):
        """These settings as command-line options (for the worker process)."""
        return settings_argv(self)


def given_values(settings_cls, args):
    """The fields of the dataclass ``settings_cls`` that ``args`` (parsed options) gives, ``workdir`` made absolute
    (the worker process may run elsewhere)."""
    values = {f.name: getattr(args, f.name) for f in fields(settings_cls) if getattr(args, f.name, None) is not None}
    values["workdir"] = os.path.abspath(values.get("workdir", settings_cls.workdir))
    return values


def settings_argv(settings):
    """A settings dataclass as the command-line options that give it back (``--name-with-dashes value ...``)."""
    argv = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        argv += ["--" + f.name.replace("_", "-")] + ([str(v) for v in value] if isinstance(value, tuple)
                                                     else [str(value)])
    return argv


def crossget_rv_limit() -> int:
    """The most tokens CrossGET can merge per block of the demo's ViT: half its unprotected tokens ([CLS] and the
    cross token are protected, so half the patch tokens)."""
    patches = (TINY_IMAGE_SIZE // DEMO_PATCH_SIZE) ** 2
    return patches // 2


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    default = DemoSettings()
    parser.add_argument("--workdir", help=f"where data, checkpoints and results go (default: {default.workdir})")
    parser.add_argument("--n-train", type=int, help=f"training images (default: {default.n_train})")
    parser.add_argument("--n-val", type=int, help=f"validation images (default: {default.n_val})")
    parser.add_argument("--n-test", type=int, help=f"test images (default: {default.n_test})")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default: {default.epochs})")
    parser.add_argument("--batch-size", type=int, help=f"training batch size (default: {default.batch_size})")
    parser.add_argument("--k-test", type=int, help=f"ITM re-ranking candidates (default: {default.k_test})")
    parser.add_argument("--r-values", type=int, nargs="+",
                        help=f"tokens merged per ViT block, one setting each (default: {list(default.r_values)})")
    parser.add_argument("--madtp-p", type=float,
                        help=f"MADTP's target: the share of GFLOPs to remove (default: {default.madtp_p})")
    parser.add_argument("--madtp-epochs", type=int,
                        help=f"epochs of MADTP's compression fine-tuning (default: {default.madtp_epochs})")
    parser.add_argument("--crossget-rv", type=int,
                        help=f"CrossGET's tokens merged per ViT block (default: {default.crossget_rv}; no text "
                             "merging)")
    parser.add_argument("--crossget-epochs", type=int,
                        help=f"epochs of CrossGET's fine-tuning with its JS loss (default: {default.crossget_epochs})")
    parser.add_argument("--dlip-epochs", type=int,
                        help=f"epochs of each DLIP student's training: distilled from the trained model, and on the "
                             f"task losses only (default: {default.dlip_epochs})")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help=f"the methods to train and compare with the parent (default: all, {' '.join(METHODS)}); "
                             "tome turbo alone is the quickest run")
    parser.add_argument("--seed", type=int, help=f"seed of data and training (default: {default.seed})")
    return parser

