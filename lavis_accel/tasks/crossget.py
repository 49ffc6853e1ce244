"""CrossGET fine-tuning through LAVIS's runner: the task's loss plus the JS-style loss of the cross tokens.

Registered task ``crossget_retrieval``: LAVIS's ``retrieval`` task whose training loss is
``(1 - w) * task loss + w * model.crossget_kd_loss()`` (CrossGET's ``train_retrieval_clip.py``, ``w = 0.5``), for
``clip_crossget`` and ``blip_retrieval_crossget``. Setting, in the project's ``run.crossget`` block:

- ``kd_weight`` (0.5): ``w``, in ``[0, 1]``. At 0 the loss is not computed (the task loss alone trains the model,
  offsets included through the forward), so a CLIP whose towers differ in depth (ViT-L) can train too.

``log.txt``'s train line gets ``loss_kd``, the mean JS loss of the epoch (all ranks). Evaluation is LAVIS's.
"""
import numbers
from collections.abc import Mapping

from lavis.tasks.retrieval import RetrievalTask

from lavis_accel.errors import SettingError
from lavis_accel.models.crossget_model import CrossGetModel
from lavis_accel.registration import register_task
from lavis_accel.tasks.ranks import add_to_mean, mean_over_ranks, unwrapped

DEFAULT_KD_WEIGHT = 0.5


def kd_weight_of(run_cfg) -> float:
    """``run.crossget.kd_weight`` (default 0.5), refused in one line unless a number in [0, 1]."""
    block = run_cfg.get("crossget") or {}
    if not isinstance(block, Mapping):
        raise SettingError("run.crossget must be a block of settings (kd_weight)")
    unknown = sorted(set(block) - {"kd_weight"})
    if unknown:
        raise SettingError(f"run.crossget.{unknown[0]} is not a CrossGET setting: use kd_weight")
    weight = block.get("kd_weight", DEFAULT_KD_WEIGHT)
    if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not 0 <= weight <= 1:
        raise SettingError(f"run.crossget.kd_weight must be a number from 0 to 1, got {weight!r}")
    return float(weight)


@register_task("crossget_retrieval")
class CrossGetRetrievalTask(RetrievalTask):
    """LAVIS's ``retrieval`` task with CrossGET's loss (see the module docstring)."""

    @classmethod
    def check_run_settings(cls, run_cfg, training):
        """``run.crossget``, checked before any work (``run_checks``)."""
        return kd_weight_of(run_cfg)

    @classmethod
    def setup_task(cls, cfg):
        weight = cls.check_run_settings(cfg.run_cfg, not cfg.run_cfg.get("evaluate", False))
        task = super().setup_task(cfg=cfg)
        task.kd_weight = weight
        task._kd_total = None
        return task

    def build_model(self, cfg):
        model = super().build_model(cfg)
        if not isinstance(model, CrossGetModel):
            raise SettingError(f"run.task crossget_retrieval needs a CrossGET model (clip_crossget, "
                               f"blip_retrieval_crossget), not model.arch {cfg.model_cfg.arch}")
        check_towers = getattr(model, "check_paired_towers", None)
        if self.kd_weight > 0 and check_towers is not None:
            check_towers()  # before any work: the loss pairs the towers' blocks one to one
        return model

    def train_step(self, model, samples):
        loss = super().train_step(model, samples)
        if self.kd_weight == 0:
            return loss
        kd = unwrapped(model).crossget_kd_loss()
        self._kd_total = add_to_mean(self._kd_total, kd)
        return (1 - self.kd_weight) * loss + self.kd_weight * kd

    def train_epoch(self, *args, **kwargs):
        self._kd_total = None
        stats = super().train_epoch(*args, **kwargs)
        return {**stats, "loss_kd": mean_over_ranks(self._kd_total)}

