"""Narrow, guarded fixes that let LAVIS 1.0.2 run on a CPU-only, offline machine.

Each fix applies only when the problem it fixes is actually present, so a GPU user's run with matching
wheels behaves exactly as stock LAVIS.
"""
import logging
import os
import sys
import tempfile
import warnings

logger = logging.getLogger(__name__)

def quiet_known_warnings():
    """Hide the FutureWarnings fairscale 0.4.4 (pinned by LAVIS) prints on every import about torch.cuda.amp."""
    warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.custom_[fb]wd", category=FutureWarning)


_TORCHVISION_OP_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def ensure_torchvision_importable():
    """Import torchvision, defining its two missing op schemas if a CUDA wheel sits beside CPU torch.

    PyPI's torchvision 0.28 is built against CUDA torch; beside the CPU build of torch 2.13 its import fails
    with ``operator torchvision::nms does not exist``. Declaring the schemas (no kernels: LAVIS never calls
    nms) lets transforms, datasets and every LAVIS processor work. Any other import error is re-raised.
    """
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for name, schema in _TORCHVISION_OP_SCHEMAS.items():
        try:
            torch.library.define(f"torchvision::{name}", schema)
        except RuntimeError:  # already declared by an earlier attempt
            pass
    import torchvision  # noqa: F401,F811

    logger.info("torchvision: declared missing op schemas %s (CUDA wheel beside CPU torch)",
                sorted(_TORCHVISION_OP_SCHEMAS))


class _HostLoader:
    """Stand-in for LAVIS's ``PrefetchLoader`` when CUDA is absent: iterates the loader, moves nothing.

    ``PrefetchLoader.__init__`` creates a ``torch.cuda.Stream`` unconditionally, which fails on a CPU-only build.
    """

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _SingleProcessDistributed:
    """``torch.distributed`` as a LAVIS module sees it, except where no process group exists (one process):
    ``barrier()`` does nothing, ``get_rank()`` is 0 and ``get_world_size()`` is 1, as LAVIS's own ``dist_utils``
    helpers answer. With a group (any torchrun job) every call goes to torch.distributed unchanged.

    LAVIS calls them unconditionally: ``RunnerBase.train`` (a barrier after every epoch) and BLIP-2's Q-Former (its
    rank, for the contrastive targets). CLIP's ``loss`` imports torch.distributed inside the property, out of a
    module-level patch's reach: it still needs a process group.
    """

    def __init__(self, dist):
        self._dist = dist

    def _initialized(self):
        return self._dist.is_available() and self._dist.is_initialized()

    def barrier(self, *args, **kwargs):
        return self._dist.barrier(*args, **kwargs) if self._initialized() else None

    def get_rank(self, *args, **kwargs):
        return self._dist.get_rank(*args, **kwargs) if self._initialized() else 0

    def get_world_size(self, *args, **kwargs):
        return self._dist.get_world_size(*args, **kwargs) if self._initialized() else 1

    def __getattr__(self, name):
        return getattr(self._dist, name)


def _gather_with_grad_if_distributed(stock_gather):
    """LAVIS's ``all_gather_with_grad`` that, with no process group, returns its input, as it does for one rank."""

    def all_gather_with_grad(tensors):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return tensors
        return stock_gather(tensors)

    return all_gather_with_grad


def enable_single_process_runs():
    """Let LAVIS code that assumes a process group run in one process (``distributed: False``). Idempotent.

    Patched, in the modules that use them: ``dist`` (see ``_SingleProcessDistributed``) in the runners and BLIP-2's
    Q-Former; ``all_gather_with_grad`` (which asks torch for the world size first) wherever LAVIS imported
    it: BLIP retrieval with ``negative_all_rank``, BLIP-2's Q-Former, ALPRO. Nothing changes once a group exists.
    """
    import lavis.models.alpro_models.alpro_retrieval as alpro_retrieval
    import lavis.models.base_model as base_model
    import lavis.models.blip2_models.blip2_qformer as blip2_qformer
    import lavis.models.blip_models.blip_retrieval as blip_retrieval
    import lavis.runners.runner_base as runner_base
    import lavis.runners.runner_iter as runner_iter

    if getattr(base_model, "_lavis_accel_single_process", False):
        return
    for module in (runner_base, runner_iter, blip2_qformer):
        module.dist = _SingleProcessDistributed(module.dist)
    gather = _gather_with_grad_if_distributed(base_model.all_gather_with_grad)
    for module in (base_model, blip_retrieval, blip2_qformer, alpro_retrieval):
        module.all_gather_with_grad = gather
    base_model._lavis_accel_single_process = True


def enable_cpu_runner():
    """Let LAVIS's ``RunnerBase`` train and evaluate in one CPU process (``device: cpu, distributed: False``).

    Fixes, each only where stock LAVIS 1.0.2 would crash:
    1. ``RunnerBase.model`` returns None when the model already sits on the run device: return the model.
    2. ``PrefetchLoader`` needs CUDA streams: without CUDA, use a plain loader.
    3. ``task.evaluation`` moves batches to CUDA by default: without CUDA, keep them on the host.
    Idempotent. On a machine with CUDA, 2 and 3 change nothing; 1 only acts where LAVIS would fail.
    """
    import torch
    import lavis.datasets.data_utils as data_utils
    import lavis.runners.runner_base as runner_base
    import lavis.tasks.base_task as base_task
    import lavis.tasks.dialogue as dialogue_task

    if getattr(runner_base, "_lavis_accel_cpu_runner", False):
        return
    runner_cls = runner_base.RunnerBase
    stock_model = runner_cls.model.fget

    def model(self):
        wrapped = stock_model(self)
        if wrapped is None and not self.use_distributed:
            self._wrapped_model = self._model
            wrapped = self._model
        return wrapped

    runner_cls.model = property(model, doc=runner_cls.model.__doc__)

    if not torch.cuda.is_available():
        runner_base.PrefetchLoader = _HostLoader
        stock_prepare_sample = data_utils.prepare_sample

        def prepare_sample(samples, cuda_enabled=True):
            return stock_prepare_sample(samples, cuda_enabled=False)

        base_task.prepare_sample = prepare_sample
        dialogue_task.prepare_sample = prepare_sample
    runner_base._lavis_accel_cpu_runner = True


def _current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _save_atomically(stock_save):
    """``torch.save`` that writes to a temporary file beside the target, then renames it into place."""

    def save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)):
            return stock_save(obj, f, *args, **kwargs)
        directory = os.path.dirname(os.path.abspath(f))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=directory)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; torch.save's file would follow the umask
        try:
            stock_save(obj, tmp, *args, **kwargs)
            os.replace(tmp, f)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    return save


def _resume_load_state_dict(model, path):
    """``load_state_dict`` for resuming from a LAVIS checkpoint, which omits every parameter with requires_grad False.

    Keys missing from the file are accepted only when they are such frozen parameters (e.g. BLIP's momentum
    encoders); a tensor of another shape, any other missing key or an unexpected key is refused in one line.
    """
    from lavis_accel.config_checks import state_dict_misfit
    from lavis_accel.errors import SettingError

    stock_load = type(model).load_state_dict.__get__(model)

    def load(state_dict, strict=True):
        problem = state_dict_misfit(model, state_dict)
        if problem:
            raise SettingError(f"run.resume_ckpt_path: {path} {problem}")
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        result = stock_load(state_dict, strict=False)
        missing = [k for k in result.missing_keys if k not in frozen]
        if strict and (missing or result.unexpected_keys):
            raise SettingError(f"run.resume_ckpt_path: {path} does not fit {type(model).__name__}: missing "
                               f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}")
        return result

    return load


def enable_safe_checkpoints():
    """Make LAVIS's runner write checkpoints atomically and resume from its own checkpoints.

    ``RunnerBase._save_checkpoint`` writes ``checkpoint_*.pth`` in place (a crash mid-write leaves a corrupt file);
    ``RunnerBase._load_checkpoint`` loads strictly a state dict from which ``_save_checkpoint`` dropped the frozen
    parameters, so resuming any model with frozen weights fails. Idempotent.
    """
    import torch
    import lavis.runners.runner_base as runner_base

    runner_cls = runner_base.RunnerBase
    if getattr(runner_cls, "_lavis_accel_safe_checkpoints", False):
        return
    stock_save_checkpoint = runner_cls._save_checkpoint
    stock_load_checkpoint = runner_cls._load_checkpoint

    def _save_checkpoint(self, cur_epoch, is_best=False):
        stock_torch_save = torch.save
        torch.save = _save_atomically(stock_torch_save)
        try:
            return stock_save_checkpoint(self, cur_epoch, is_best)
        finally:
            torch.save = stock_torch_save

    def _load_checkpoint(self, url_or_filename):
        model = self.unwrap_dist_model(self.model)
        model.load_state_dict = _resume_load_state_dict(model, url_or_filename)
        try:
            return stock_load_checkpoint(self, url_or_filename)
        finally:
            del model.load_state_dict

    runner_cls._save_checkpoint = _save_checkpoint
    runner_cls._load_checkpoint = _load_checkpoint
    runner_cls._lavis_accel_safe_checkpoints = True


class _SpiceUnavailable:
    """Stands in for pycocoevalcap's SPICE scorer when Stanford CoreNLP is absent and cannot be downloaded."""

    def compute_score(self, gts, res):
        return float("nan"), [float("nan")] * len(gts)

    def method(self):  # printed by COCOEvalCap.evaluate as "computing <method> score..."
        return "SPICE (skipped: Stanford CoreNLP unavailable)"


def skip_spice_when_offline():
    """Let COCO caption evaluation run offline: SPICE is left out with a warning, never reported as 0.

    pycocoevalcap's SPICE downloads Stanford CoreNLP (about 400 MB) the first time it is built; offline that raises
    and LAVIS's caption evaluation fails after the whole test split was captioned. Where the jar is present, or the
    download works, nothing changes. Otherwise SPICE is skipped and removed from the reported metrics.
    """
    import pycocoevalcap.eval as cap_eval

    if getattr(cap_eval, "_lavis_accel_spice_guard", False):
        return
    stock_spice = cap_eval.Spice
    stock_evaluate = cap_eval.COCOEvalCap.evaluate

    def spice_or_skip():
        try:
            return stock_spice()
        except OSError as err:  # urllib's URLError and socket errors are OSErrors
            logger.warning("SPICE skipped, not reported: Stanford CoreNLP is not installed for pycocoevalcap and "
                           "could not be downloaded (%s)", err)
            return _SpiceUnavailable()

    def evaluate(self):
        stock_evaluate(self)
        if isinstance(self.eval.get("SPICE"), float) and self.eval["SPICE"] != self.eval["SPICE"]:  # NaN: skipped
            del self.eval["SPICE"]
            for scores in self.imgToEval.values():
                scores.pop("SPICE", None)
            self.setEvalImgs()

    cap_eval.Spice = spice_or_skip
    cap_eval.COCOEvalCap.evaluate = evaluate
    cap_eval._lavis_accel_spice_guard = True
