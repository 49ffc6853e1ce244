"""MADTP compression fine-tuning through LAVIS's runner: the alignment term and the tau / GFLOPs controller.

Registered tasks, each LAVIS's own task plus ``MadtpTask``: ``madtp_retrieval`` (BLIP and CLIP), ``madtp_captioning``,
``madtp_vqa``, ``madtp_multimodal_classification`` (NLVR2). Settings, in the project's ``run.madtp`` block:

- ``p``: the share of the parent's GFLOPs to remove, in (0, 1); the target is ``(1 - p) * GFLOPs(parent)``.
- ``alignment_weight`` (0.1): the training loss is the task's loss plus this times ``model.alignment_loss()``.
- ``flops_batches`` (20): GFLOPs per sample are measured on this many batches (``run.batch_size_eval``) of the first
  validation split (else the first test split), as the reference's ``calculate_temperature`` loop does.
- ``tolerance``: a fraction of the parent's GFLOPs; an epoch competes for the best checkpoint only when
  ``GFLOPs - target < tolerance * parent``. Default: the reference's threshold scaled to its parent (5 GFLOPs of
  132.54 for NLVR2, 5 of 65.7 for captioning, 10 of 153.2 for BLIP retrieval, 5 of 395.7 for CLIP retrieval).
- ``calculate_temperature`` (False): search tau before epoch 0 until the GFLOPs are within the reference's search
  tolerance, at most ``search_rounds`` (20) measurements.

What happens, per epoch ``e`` of a training run (LAVIS's ``runner_base``):
1. Epoch 0: the parent's GFLOPs are measured once, under ``model.unpruned()`` (never hard-coded), then the optional
   tau search. Epoch ``e > 0``: tau moves by the reference's step table toward the target, from the GFLOPs measured
   after epoch ``e - 1``: up when they exceed the target (a larger tau prunes more), down otherwise, never below 0.
2. Training, with the alignment term.
3. The GFLOPs per sample are measured with the plugin's FLOP counter around the task's own evaluation step
   (``valid_step``; retrieval, which has none, scores one matching image-text pair: ``retrieval_pair_probe``).
4. Validation: ``agg_metrics`` of an epoch outside the tolerance is set to ``NOT_ELIGIBLE``, so LAVIS's runner never
   keeps it as the best checkpoint; the task's metric stays in ``metric``. If no epoch was within the tolerance by the
   last one, the last epoch competes (with a warning), so that LAVIS still tests a model.
``log.txt`` gets, on the train line, ``temperature`` (tau of the epoch), ``loss_alignment``, ``gflops``,
``parent_gflops``, ``target_gflops``, ``in_tolerance``; on the val line the same plus ``metric`` and LAVIS's
``best_epoch``. In an evaluation-only run, the GFLOPs of each evaluated split (and the parent's) are logged.

Scale. The reference's gaps and tolerances are absolute GFLOPs (fvcore, a multiply-add counted once) of ViT-B at
384 px (VQA 480 px) or CLIP-L at 336 px. Here every gap is taken as a fraction of the parent's GFLOPs, the reference's
tables divided by the reference's parent GFLOPs, so a tiny model and a ViT-L step alike; GFLOPs are torch's
(a multiply-add counts 2). Differences from the reference, on purpose:
- VQA: the reference never updates its measured GFLOPs, so tau grows by 0.25 every epoch; here they are measured.
- The best checkpoint is chosen on the validation split (LAVIS's rule); the reference chose on test.
- The tau search measures at the starting tau first and stops after ``search_rounds`` (the reference steps before
  measuring and can loop forever); NLVR2 and VQA, which have no search in the reference, use the captioning table.
- tau never goes below 0 (the reference's could, inverting its softmax).

Exact resume. The controller's state is in the checkpoint: tau in the model's ``madtp_temperature`` buffer, and the
last measured and the parent's GFLOPs and the count of epochs within the tolerance in the buffers of
``ControllerState`` (``madtp_controller.*``), which the task attaches to the model it builds.
"""
import logging
import math
import numbers
from dataclasses import asdict, dataclass, fields
from collections.abc import Mapping
from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader

import lavis.tasks.base_task as base_task
from lavis.tasks.captioning import CaptionTask
from lavis.tasks.multimodal_classification import MultimodalClassificationTask
from lavis.tasks.retrieval import RetrievalTask
from lavis.tasks.vqa import VQATask

from lavis_accel.bench.flops import count_flops
from lavis_accel.errors import SettingError
from lavis_accel.registration import register_task
from lavis_accel.tasks.ranks import add_to_mean, mean_over_ranks, unwrapped

logger = logging.getLogger(__name__)

NOT_ELIGIBLE = -1.0  # below every metric LAVIS's tasks report and below the runner's starting best of 0
STATE_ATTR = "madtp_controller"
MODEL_API = ("temperature", "set_temperature", "madtp_temperature", "alignment_loss", "unpruned")


@dataclass(frozen=True)
class StepTable:
    """The reference's if/elif chain of tau steps: the step of the first ``(gap, step)`` whose gap the measured gap
    exceeds, else ``below``. Gaps are fractions of the parent's GFLOPs."""

    steps: Tuple[Tuple[float, float], ...]
    below: float

    @classmethod
    def from_reference(cls, parent_gflops, steps, below):
        """A table from the reference's absolute GFLOPs gaps, for a parent of ``parent_gflops``."""
        return cls(tuple((gap / parent_gflops, step) for gap, step in steps), below)

    def step(self, gap: float) -> float:
        for threshold, step in self.steps:
            if gap > threshold:
                return step
        return self.below


@dataclass(frozen=True)
class Schedule:
    """How the reference moves tau for one task: per epoch, in the initial search, and the tolerances (fractions of
    the parent's GFLOPs) of the search and of the best checkpoint."""

    epoch: StepTable
    search: StepTable
    search_tolerance: float
    tolerance: float


def reference_schedule(parent_gflops, epoch_steps, epoch_below, tolerance, search_steps=None, search_below=0.02,
                       search_tolerance=10.0):
    """A ``Schedule`` from the reference's numbers (absolute GFLOPs at its parent's ``parent_gflops``)."""
    search_steps = search_steps or ((100, 1.0), (50, 0.5), (30, 0.3), (20, 0.2), (10, 0.1), (5, 0.05))
    return Schedule(
        epoch=StepTable.from_reference(parent_gflops, epoch_steps, epoch_below),
        search=StepTable.from_reference(parent_gflops, search_steps, search_below),
        search_tolerance=search_tolerance / parent_gflops,
        tolerance=tolerance / parent_gflops,
    )


_FINE_STEPS = ((50, 0.5), (30, 0.3), (20, 0.2), (10, 0.1), (5, 0.05), (2, 0.02))  # caption and retrieval epochs
SCHEDULES = {  # compress_{nlvr,caption,vqa,retrieval,retrieval_clip}_dtp.py
    "nlvr": reference_schedule(132.54, ((30, 1.0), (10, 0.5), (5, 0.25), (1, 0.1)), 0.01, tolerance=5.0),
    "captioning": reference_schedule(65.7, _FINE_STEPS, 0.01, tolerance=5.0),
    "vqa": reference_schedule(186.1, ((50, 0.25), (30, 0.15), (10, 0.1), (5, 0.05), (2, 0.01)), 0.0, tolerance=5.0),
    "blip_retrieval": reference_schedule(153.2, _FINE_STEPS, 0.01, tolerance=10.0),
    "clip_retrieval": reference_schedule(
        395.7, _FINE_STEPS, 0.01, tolerance=5.0, search_steps=((100, 0.5), (50, 0.25), (30, 0.15), (20, 0.1),
                                                               (10, 0.05)), search_tolerance=5.0),
}


def next_temperature(tau: float, gflops: float, target: float, parent: float, table: StepTable) -> float:
    """tau after one controller step: up by the table's step when ``gflops`` exceed ``target``, else down; >= 0."""
    gap = (gflops - target) / parent
    step = table.step(abs(gap))
    return tau + step if gap > 0 else max(0.0, tau - step)


def within(gflops: float, target: float, parent: float, tolerance: float) -> bool:
    """The reference's best-checkpoint test ``GFLOPs - target < tolerance`` (any epoch below the target passes)."""
    return (gflops - target) / parent < tolerance


# ----------------------------------------------------------------------------------------------------- settings
def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class MadtpSettings:
    """The ``run.madtp`` block (see the module docstring), checked in one line per bad setting."""

    p: Optional[float] = None
    alignment_weight: float = 0.1
    flops_batches: int = 20
    tolerance: Optional[float] = None
    calculate_temperature: bool = False
    search_rounds: int = 20

    @classmethod
    def from_run(cls, run_cfg, training):
        block = run_cfg.get("madtp") or {}
        if not isinstance(block, Mapping):
            raise SettingError(f"run.madtp must be a block of MADTP settings (p, ...), got {block!r}")
        known = [f.name for f in fields(cls)]
        unknown = [key for key in block if key not in known]
        if unknown:
            raise SettingError(f"run.madtp.{unknown[0]} is not a MADTP setting: use {', '.join(known)}")
        settings = cls(**dict(block))
        settings.check(training)
        return settings

    def check(self, training):
        if training and not (_is_number(self.p) and 0 < self.p < 1):
            raise SettingError(f"run.madtp.p must be a number in (0, 1) (the share of the parent's GFLOPs to "
                               f"remove), got {self.p!r}")
        if not (_is_number(self.alignment_weight) and self.alignment_weight >= 0):
            raise SettingError(f"run.madtp.alignment_weight must be a number >= 0, got {self.alignment_weight!r}")
        if self.tolerance is not None and not (_is_number(self.tolerance) and self.tolerance > 0):
            raise SettingError(f"run.madtp.tolerance must be a number > 0 (a fraction of the parent's GFLOPs), got "
                               f"{self.tolerance!r}")
        for key in ("flops_batches", "search_rounds"):
            value = getattr(self, key)
            if not (_is_int(value) and value >= 1):
                raise SettingError(f"run.madtp.{key} must be an integer of at least 1, got {value!r}")
        if not isinstance(self.calculate_temperature, bool):
            raise SettingError(f"run.madtp.calculate_temperature must be True or False, got "
                               f"{self.calculate_temperature!r}")


def measurement_split(run_cfg):
    """The split GFLOPs are measured on: ``val`` when validated, else the first validation or test split."""
    valid = list(run_cfg.get("valid_splits") or [])
    splits = (["val"] if "val" in valid else []) + valid + list(run_cfg.get("test_splits") or [])
    if not splits:
        raise SettingError("run.valid_splits / run.test_splits: MADTP measures GFLOPs on a validation or test split: "
                           "name one")
    return splits[0]


def check_runner(run_cfg):
    """MADTP moves tau once per epoch: only LAVIS's epoch runner drives it."""
    runner = run_cfg.get("runner", "runner_base")
    if runner != "runner_base":
        raise SettingError(f"run.runner '{runner}': MADTP tasks update tau once per epoch: use runner_base")


# ---------------------------------------------------------------------------------------------- model state
class ControllerState(torch.nn.Module):
    """The controller's state a checkpoint carries for an exact resume (NaN: not measured yet)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gflops", torch.tensor(float("nan")))  # after the last trained epoch
        self.register_buffer("parent_gflops", torch.tensor(float("nan")))
        self.register_buffer("epochs_in_tolerance", torch.tensor(0))


def set_temperature(net, tau):
    """``net.set_temperature(tau)`` with tau rounded to the dtype of the model's ``madtp_temperature`` buffer first,
    so that the run goes on with exactly the tau a checkpoint restores (a float32 buffer holds 1.35 as 1.3499999)."""
    net.set_temperature(float(torch.tensor(tau, dtype=net.madtp_temperature.dtype)))


def check_madtp_model(model, arch):
    """A MADTP task needs a MADTP model (``blip_*_madtp``, ``clip_madtp``): refused in one line otherwise."""
    missing = [name for name in MODEL_API if not hasattr(model, name)]
    if missing:
        raise SettingError(f"model.arch: {arch} is not a MADTP model (it has no {missing[0]}): MADTP tasks train "
                           f"blip_<task>_madtp or clip_madtp")


# ------------------------------------------------------------------------------------------------- measuring
def _model_device(model):
    return next(model.parameters()).device


def probe_loader(dataset, run_cfg):
    """Batches of ``dataset`` as the evaluation sees them (``batch_size_eval``, in order, the dataset's collater).

    Every rank reads the same batches, so every rank measures the same GFLOPs and moves tau alike.
    """
    return DataLoader(dataset, batch_size=run_cfg.batch_size_eval, shuffle=False,
                      num_workers=run_cfg.get("num_workers", 0), collate_fn=getattr(dataset, "collater", None))


def measure_gflops(probe, model, dataset, run_cfg, num_batches) -> float:
    """GFLOPs per sample of ``probe(model, samples, dataset)`` (which returns its sample count) over the first
    ``num_batches`` batches, in evaluation mode, without gradients, leaving the training RNG streams untouched."""
    net, flops, samples_seen = unwrapped(model), 0, 0
    was_training = net.training
    net.eval()
    cuda = _model_device(net).type == "cuda"
    devices = [_model_device(net)] if cuda else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        for index, samples in enumerate(probe_loader(dataset, run_cfg)):
            if index >= num_batches:
                break
            samples = base_task.prepare_sample(samples, cuda_enabled=cuda)
            counted = []
            flops += count_flops(lambda: counted.append(probe(net, samples, dataset)))
            samples_seen += counted[0]
    net.train(was_training)
    if samples_seen == 0:
        raise SettingError("datasets: the split MADTP measures GFLOPs on has no samples")
    return flops / samples_seen / 1e9


def retrieval_pair_probe(model, samples, dataset):
    """What retrieval evaluation costs per matching image-text pair (LAVIS's ``compute_sim_matrix`` has no per-batch
    step to count): BLIP encodes the image and the caption and scores the pair once with the ITM head, as its
    re-ranking does; CLIP encodes both. An evaluation image's caption is its first (``img2txt[i][0]``); a training
    split's own ``text_input`` is used as is. Returns the number of pairs."""
    image = samples["image"]
    texts = samples.get("text_input") or [dataset.text[dataset.img2txt[int(i)][0]] for i in samples["index"]]
    if hasattr(model, "itm_head"):
        _blip_pair(model, image, texts)
    else:
        model.encode_image(image)
        model.encode_text(model.tokenizer(texts).to(image.device))
    return len(texts)


def _blip_pair(model, image, texts):
    """BLIP's unimodal image and text passes and one ITM pass over the pair (texts padded to 35, as LAVIS does)."""
    image_embeds = model.visual_encoder.forward_features(image)
    text = model.tokenizer(texts, padding="max_length", truncation=True, max_length=35,
                           return_tensors="pt").to(image.device)
    model.text_encoder.forward_text(text)
    encoder_ids = text.input_ids.clone()
    encoder_ids[:, 0] = model.tokenizer.enc_token_id
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
    output = model.text_encoder(encoder_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_atts, return_dict=True)
    model.itm_head(output.last_hidden_state[:, 0, :])


# ------------------------------------------------------------------------------------------------------ task
@dataclass(frozen=True)
class EpochRecord:
    """What the controller logs for a trained epoch (GFLOPs per sample)."""

    temperature: float  # the tau the epoch trained and was measured at
    gflops: float
    parent_gflops: float
    target_gflops: float
    in_tolerance: bool


class MadtpTask:
    """Mixin placed before a LAVIS task class: the alignment term in ``train_step`` and the tau / GFLOPs controller
    around LAVIS's own epochs (see the module docstring). ``family`` names the task's ``SCHEDULES`` entry."""

    family = None

    @classmethod
    def check_run_settings(cls, run_cfg, training):
        """The ``run.madtp`` block, the measurement split and the runner, checked before any work (``run_checks``)."""
        settings = MadtpSettings.from_run(run_cfg, training)
        split = measurement_split(run_cfg)
        if training:
            check_runner(run_cfg)
        return settings, split

    @classmethod
    def setup_task(cls, cfg):
        run_cfg = cfg.run_cfg
        training = not run_cfg.get("evaluate", False)
        settings, split = cls.check_run_settings(run_cfg, training)
        task = super().setup_task(cfg=cfg)
        task._attach(settings, run_cfg, split, training)
        return task

    def _attach(self, settings, run_cfg, split, training):
        """The MADTP part of the task's state (LAVIS's ``setup_task`` builds the task with its own arguments)."""
        self.madtp = settings
        self.madtp_run_cfg = run_cfg
        self.madtp_split = split
        self.madtp_training = training
        self.madtp_selects_best = "val" in (run_cfg.get("valid_splits") or [])  # LAVIS keeps the best val epoch
        self.madtp_datasets = {}
        self.madtp_epochs = {}  # epoch -> (EpochRecord, whether its validation competes for the best checkpoint)
        self._alignment = None

    # ---- LAVIS's task hooks
    def build_datasets(self, cfg):
        self.madtp_datasets = super().build_datasets(cfg)
        self._measurement_dataset()  # a missing split is refused now, before the model is built
        return self.madtp_datasets

    def build_model(self, cfg):
        model = super().build_model(cfg)
        check_madtp_model(model, cfg.model_cfg.arch)
        setattr(model, STATE_ATTR, ControllerState().to(_model_device(model)))
        return model

    def train_step(self, model, samples):
        loss = super().train_step(model, samples)
        term = unwrapped(model).alignment_loss()
        if term is None:
            return loss
        self._alignment = add_to_mean(self._alignment, term)
        return loss + self.madtp.alignment_weight * term

    def train_epoch(self, epoch, model, *args, **kwargs):
        net = unwrapped(model)
        self._start_epoch(net, epoch)
        self._alignment = None
        stats = super().train_epoch(epoch, model, *args, **kwargs)
        record = self._end_epoch(net, epoch)
        return {**stats, "loss_alignment": mean_over_ranks(self._alignment), **asdict(record)}

    def evaluation(self, model, data_loader, **kwargs):
        results = super().evaluation(model, data_loader, **kwargs)
        if not self.madtp_training:
            self._log_evaluation_gflops(model, data_loader.dataset)
        return results

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        metrics = super().after_evaluation(val_result=val_result, split_name=split_name, epoch=epoch, **kwargs)
        if split_name != "val" or not isinstance(metrics, dict) or epoch not in self.madtp_epochs:
            return metrics
        record, eligible = self.madtp_epochs[epoch]
        metric = metrics.get("agg_metrics")
        return {**metrics, **asdict(record), "metric": metric, "agg_metrics": metric if eligible else NOT_ELIGIBLE}

    # ---- measuring
    def schedule(self, model) -> Schedule:
        return SCHEDULES[self.family]

    def tolerance(self, model) -> float:
        return self.madtp.tolerance if self.madtp.tolerance is not None else self.schedule(model).tolerance

    def probe(self, model, samples, dataset):
        """The task's own evaluation step on ``samples``; returns the number of samples."""
        return len(self.valid_step(model=model, samples=samples))

    def measure(self, model, dataset=None) -> float:
        """GFLOPs per sample of the model as it is now, on ``dataset`` (default: the measurement split)."""
        dataset = dataset if dataset is not None else self._measurement_dataset()
        return measure_gflops(self.probe, model, dataset, self.madtp_run_cfg, self.madtp.flops_batches)

    def parent_gflops(self, net) -> float:
        """The parent's GFLOPs per sample, measured once under ``model.unpruned()`` and kept in the model's state."""
        state = getattr(net, STATE_ATTR)
        if torch.isnan(state.parent_gflops):
            with net.unpruned():
                state.parent_gflops.fill_(self.measure(net))
        return float(state.parent_gflops)

    def target_gflops(self, net) -> float:
        return (1.0 - self.madtp.p) * self.parent_gflops(net)

    def _measurement_dataset(self):
        for splits in self.madtp_datasets.values():
            if self.madtp_split in splits:
                return splits[self.madtp_split]
        raise SettingError(f"datasets: no dataset has the split '{self.madtp_split}' that MADTP measures GFLOPs on")

    def _split_name(self, dataset):
        for splits in self.madtp_datasets.values():
            for name, candidate in splits.items():
                if candidate is dataset:
                    return name
        return "evaluation"

    def _log_evaluation_gflops(self, model, dataset):
        gflops = self.measure(model, dataset)
        with unwrapped(model).unpruned():
            parent = self.measure(model, dataset)
        logger.info("madtp: %s at tau %g: %.6g GFLOPs per sample, %.1f%% of the parent's %.6g",
                    self._split_name(dataset), unwrapped(model).temperature, gflops, 100.0 * gflops / parent, parent)

    # ---- the controller
    def _start_epoch(self, net, epoch):
        """Epoch 0: the parent's GFLOPs and the optional tau search; later epochs: one step toward the target."""
        if epoch > 0:
            self._step_temperature(net, epoch)
            return
        logger.info("madtp: parent %.6g GFLOPs per sample, target %.6g (p = %g)", self.parent_gflops(net),
                    self.target_gflops(net), self.madtp.p)
        if self.madtp.calculate_temperature:
            self._search_temperature(net)

    def _step_temperature(self, net, epoch):
        state = getattr(net, STATE_ATTR)
        if torch.isnan(state.gflops):  # resumed from a checkpoint written without the controller's state
            state.gflops.fill_(self.measure(net))
        gflops, target, before = float(state.gflops), self.target_gflops(net), net.temperature
        table = self.schedule(net).epoch
        set_temperature(net, next_temperature(before, gflops, target, self.parent_gflops(net), table))
        logger.info("madtp: epoch %d: tau %g -> %g (%.6g GFLOPs per sample after epoch %d, target %.6g)", epoch,
                    before, net.temperature, gflops, epoch - 1, target)

    def _search_temperature(self, net):
        """The reference's ``calculate_temperature``: step tau until the GFLOPs are within the search tolerance."""
        schedule, parent, target = self.schedule(net), self.parent_gflops(net), self.target_gflops(net)
        gflops = self.measure(net)
        for _ in range(self.madtp.search_rounds):
            logger.info("madtp: tau search: tau %g gives %.6g GFLOPs per sample (target %.6g)", net.temperature,
                        gflops, target)
            if abs(gflops - target) / parent <= schedule.search_tolerance:
                return
            set_temperature(net, next_temperature(net.temperature, gflops, target, parent, schedule.search))
            gflops = self.measure(net)
        logger.warning("madtp: tau search stopped after %d measurements at tau %g (%.6g GFLOPs per sample, target "
                       "%.6g): training starts there", self.madtp.search_rounds, net.temperature, gflops, target)

    def _end_epoch(self, net, epoch) -> EpochRecord:
        """Measure the trained epoch, keep its GFLOPs in the model's state, decide whether it may be the best."""
        state = getattr(net, STATE_ATTR)
        gflops = self.measure(net)
        state.gflops.fill_(gflops)
        parent, target = self.parent_gflops(net), self.target_gflops(net)
        record = EpochRecord(net.temperature, gflops, parent, target, within(gflops, target, parent,
                                                                             self.tolerance(net)))
        if record.in_tolerance:
            state.epochs_in_tolerance.add_(1)
        logger.info("madtp: epoch %d at tau %g: %.6g GFLOPs per sample, %.1f%% of the parent's %.6g (target %.6g, "
                    "within the tolerance: %s)", epoch, record.temperature, gflops, 100.0 * gflops / parent, parent,
                    target, "yes" if record.in_tolerance else "no")
        self.madtp_epochs[epoch] = (record, record.in_tolerance or self._last_chance(epoch, state))
        return record

    def _last_chance(self, epoch, state) -> bool:
        """The last epoch of a validated run whose epochs all missed the tolerance competes for the best checkpoint,
        so that LAVIS's final test has one (said in a warning)."""
        last = epoch == self.madtp_run_cfg.max_epoch - 1
        if not (self.madtp_selects_best and last and int(state.epochs_in_tolerance) == 0):
            return False
        logger.warning("madtp: no epoch came within the tolerance of the target GFLOPs: the last epoch competes for "
                       "the best checkpoint")
        return True

    # ---- the alignment term's mean over the epoch (one host synchronisation per epoch)


@register_task("madtp_retrieval")
class MadtpRetrievalTask(MadtpTask, RetrievalTask):
    """LAVIS's ``retrieval`` task with MADTP, for ``blip_retrieval_madtp`` (BLIP's tables) and ``clip_madtp`` (CLIP's).

    GFLOPs are those of one matching image-text pair (``retrieval_pair_probe``).
    """

    def schedule(self, model) -> Schedule:
        return SCHEDULES["blip_retrieval" if hasattr(model, "itm_head") else "clip_retrieval"]

    def probe(self, model, samples, dataset):
        return retrieval_pair_probe(model, samples, dataset)


@register_task("madtp_captioning")
class MadtpCaptionTask(MadtpTask, CaptionTask):
    """LAVIS's ``captioning`` task with MADTP (``blip_caption_madtp``); GFLOPs of beam-search captioning."""

    family = "captioning"


@register_task("madtp_vqa")
class MadtpVQATask(MadtpTask, VQATask):
    """LAVIS's ``vqa`` task with MADTP (``blip_vqa_madtp``); GFLOPs of answering (rank or generate, as configured)."""

    family = "vqa"


@register_task("madtp_multimodal_classification")
class MadtpClassificationTask(MadtpTask, MultimodalClassificationTask):
    """LAVIS's ``multimodal_classification`` task with MADTP, for NLVR2 (``blip_nlvr_madtp``)."""

    family = "nlvr"
