"""LAVIS's ``RunnerBase`` with safe checkpoint reads, atomic writes and exact resume.

A run killed mid-epoch and resumed from its ``checkpoint_last.pth`` ends bit-identical (on CPU) to the run that was
never interrupted. What LAVIS 1.0.2 loses, and how it is kept:

- its checkpoints drop every frozen parameter, momentum encoders included, and hold no RNG state: the plugin adds
  the momentum encoders and every rank's RNG states (``checkpoints.saving``);
- it saves per-epoch checkpoints only when there is no validation split: the plugin writes ``checkpoint_last.pth``
  at the start of each epoch (the state after the previous epoch and its validation; ``run.save_last: False``
  turns it off);
- resuming rebuilds the train loader at data epoch 0: the plugin restores the RNG states once the loader exists and
  restarts its iterator at the resumed epoch, so the shuffling is the uninterrupted run's;
- the best validation result is a local variable of ``train()``: the plugin stores it in checkpoints, copies the
  resumed run's ``checkpoint_best.pth`` into the new job folder and writes a new best only when it is better.
"""
import logging
import os
import shutil

from lavis.common.dist_utils import get_rank
from lavis.datasets.datasets.dataloader_utils import IterLoader
from lavis_accel import checkpoints
from lavis_accel.errors import SettingError

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "checkpoint_last.pth"
RESUME_SETTING = "run.resume_ckpt_path"
_RESUME_ENTRIES = ("model", "optimizer", "epoch")
_ITER_RESUME_ENTRIES = ("model", "optimizer", "iters")  # runner_iter counts iterations


def check_resume_contents(obj, setting, path, entries=_RESUME_ENTRIES):
    """A resume file is a dict with the model, the optimizer state and the epoch (``runner_iter``: iterations)."""
    if not isinstance(obj, dict):
        raise SettingError(f"{setting}: {path} holds a {type(obj).__name__}, not a LAVIS training checkpoint")
    missing = [key for key in entries if key not in obj]
    if missing:
        raise SettingError(f"{setting}: {path} has no {', '.join(missing)}: it is not a LAVIS training checkpoint "
                           f"(to start from model weights, set model.finetuned or model.pretrained instead)")


def resume_load_state_dict(model, path):
    """``load_state_dict`` for a resume file, which may leave out frozen parameters (LAVIS's own checkpoints do).

    A tensor of another shape, any other missing key or an unexpected key is refused in one line. Missing momentum
    encoders are accepted with a warning: they restart from the built model, so the resume is not exact.
    """
    from lavis_accel.config_checks import state_dict_misfit

    stock_load = type(model).load_state_dict.__get__(model)

    def load(state_dict, strict=True):
        problem = state_dict_misfit(model, state_dict)
        if problem:
            raise SettingError(f"{RESUME_SETTING}: {path} {problem}")
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        result = stock_load(state_dict, strict=False)
        missing = [k for k in result.missing_keys if k not in frozen]
        if strict and (missing or result.unexpected_keys):
            raise SettingError(f"{RESUME_SETTING}: {path} does not fit {type(model).__name__}: missing "
                               f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}")
        if any(name not in state_dict for name in checkpoints.momentum_state(model)):
            logger.warning("%s: %s has no momentum encoders (written by LAVIS's own runner): they restart from the "
                           "built model, so this resume is not exact", RESUME_SETTING, path)
        return result

    return load


def _restore_training_position(runner, epoch, rng_states):
    """Put the RNG states and the train loader where the uninterrupted run had them at the start of ``epoch``."""
    loader = runner.train_loader  # built now, before the states are restored: building it draws random numbers
    rank = get_rank()
    if rank < len(rng_states):
        checkpoints.set_rng_state(rng_states[rank])
    else:
        logger.warning("%s: no RNG state for rank %d in the checkpoint: the resumed run's randomness differs",
                       RESUME_SETTING, rank)
    if isinstance(loader, IterLoader):
        loader._epoch = epoch
        sampler = getattr(loader._dataloader, "sampler", None)
        if loader._use_distributed and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        loader.iter_loader = iter(loader._dataloader)


def _carry_over_best(runner, resume_path, best):
    """Copy the resumed run's best checkpoint into this run's folder, for the final test of the best model."""
    source = os.path.join(os.path.dirname(os.path.abspath(resume_path)), "checkpoint_best.pth")
    if best is None or not os.path.isfile(source):
        return
    if get_rank() == 0:
        shutil.copyfile(source, os.path.join(runner.output_dir, "checkpoint_best.pth"))
    logger.info("resume: best so far %.4f at epoch %d (%s copied into this job)", best["agg_metrics"], best["epoch"],
                source)


def enable_exact_resume():
    """Patch ``RunnerBase`` once: safe loads, complete atomic checkpoints, exact resume. Idempotent."""
    import lavis.runners.runner_base as runner_base

    runner_cls = runner_base.RunnerBase
    if getattr(runner_cls, "_lavis_accel_exact_resume", False):
        return
    stock = {name: getattr(runner_cls, name) for name in
             ("_save_checkpoint", "_load_checkpoint", "_reload_best_model", "train_epoch", "eval_epoch", "log_stats")}

    def _save_checkpoint(self, cur_epoch, is_best=False, to=None, rng_states=None):
        state = vars(self)
        if is_best:
            metric = state.get("_lavis_accel_last_val")
            best = state.get("_lavis_accel_best")
            if best is not None and metric is not None and metric <= best["agg_metrics"]:
                logger.info("epoch %d: %.4f does not beat the best %.4f of epoch %d: checkpoint_best.pth kept",
                            cur_epoch, metric, best["agg_metrics"], best["epoch"])
                return
            self._lavis_accel_best = {"epoch": cur_epoch, "agg_metrics": metric}
        model = self.unwrap_dist_model(self.model)
        entries = {"rng": rng_states or [checkpoints.rng_state()], "best": state.get("_lavis_accel_best")}
        with checkpoints.saving(checkpoints.momentum_state(model), entries, to=to):
            stock["_save_checkpoint"](self, cur_epoch, is_best)

    def _load_checkpoint(self, url_or_filename):
        model = self.unwrap_dist_model(self.model)
        model.load_state_dict = resume_load_state_dict(model, url_or_filename)
        try:
            with checkpoints.loading_safely({url_or_filename: RESUME_SETTING}, check_resume_contents) as loaded:
                stock["_load_checkpoint"](self, url_or_filename)
        except SettingError:
            raise
        except ValueError as err:  # the optimizer's parameter groups do not match
            raise SettingError(f"{RESUME_SETTING}: {url_or_filename}: {' '.join(str(err).split())}") from None
        finally:
            del model.load_state_dict
        if self.start_epoch >= self.max_epoch:
            raise SettingError(f"{RESUME_SETTING}: {url_or_filename} ends epoch {self.start_epoch - 1}: run.max_epoch "
                               f"{self.max_epoch} leaves nothing to train")
        checkpoint = loaded[-1]
        checkpoints.remove_stale_temp_files(os.path.dirname(os.path.abspath(url_or_filename)))
        self._lavis_accel_resume_rng = checkpoint.get("rng")
        self._lavis_accel_best = checkpoint.get("best")
        _carry_over_best(self, url_or_filename, self._lavis_accel_best)

    def _reload_best_model(self, model):
        best = os.path.join(self.output_dir, "checkpoint_best.pth")
        with checkpoints.loading_safely({best: "checkpoint_best.pth"}):
            return stock["_reload_best_model"](self, model)

    def train_epoch(self, epoch):
        resume_rng = vars(self).pop("_lavis_accel_resume_rng", None)
        if epoch > self.start_epoch and self.config.run_cfg.get("save_last", True):
            rng_states = checkpoints.gathered_rng_states()
            _save_checkpoint(self, epoch - 1, to=os.path.join(self.output_dir, LAST_CHECKPOINT),
                             rng_states=rng_states)
        elif resume_rng is not None:
            _restore_training_position(self, epoch, resume_rng)
        return stock["train_epoch"](self, epoch)

    def eval_epoch(self, split_name, cur_epoch, skip_reload=False):
        result = stock["eval_epoch"](self, split_name, cur_epoch, skip_reload)
        if split_name == "val" and isinstance(result, dict) and "agg_metrics" in result:
            self._lavis_accel_last_val = float(result["agg_metrics"])  # numpy scalars would not load weights-only
        return result

    def log_stats(self, stats, split_name):
        best = vars(self).get("_lavis_accel_best")
        if isinstance(stats, dict) and "best_epoch" in stats and best is not None:
            stats = {**stats, "best_epoch": best["epoch"]}  # train()'s own count restarts at a resume
        return stock["log_stats"](self, stats, split_name)

    for function in (_save_checkpoint, _load_checkpoint, _reload_best_model, train_epoch, eval_epoch, log_stats):
        function.__doc__ = stock[function.__name__].__doc__
        setattr(runner_cls, function.__name__, function)
    runner_cls._lavis_accel_exact_resume = True
    _enable_safe_iter_checkpoints()


def _enable_safe_iter_checkpoints():
    """``RunnerIter`` has its own checkpoint methods: atomic writes and safe, checked reads there too (its resume
    restores the model, optimizer and iteration, as LAVIS's does; the exact resume above is ``RunnerBase``'s)."""
    import lavis.runners.runner_iter as runner_iter

    runner_cls = runner_iter.RunnerIter
    stock_save, stock_load = runner_cls._save_checkpoint, runner_cls._load_checkpoint

    def _save_checkpoint(self, cur_iters, is_best=False):
        with checkpoints.saving({}, {}):
            stock_save(self, cur_iters, is_best)

    def _load_checkpoint(self, url_or_filename):
        def check(obj, setting, path):
            check_resume_contents(obj, setting, path, _ITER_RESUME_ENTRIES)

        with checkpoints.loading_safely({url_or_filename: RESUME_SETTING}, check):
            stock_load(self, url_or_filename)

    _save_checkpoint.__doc__, _load_checkpoint.__doc__ = stock_save.__doc__, stock_load.__doc__
    runner_cls._save_checkpoint, runner_cls._load_checkpoint = _save_checkpoint, _load_checkpoint
