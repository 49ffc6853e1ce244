"""Narrow, guarded fixes that let LAVIS 1.0.2 run on a CPU-only, offline machine.

Each fix applies only when the problem it fixes is actually present, so a GPU user's run with matching
wheels behaves exactly as stock LAVIS.
"""
import functools
import logging
import os
import sys
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
    it: BLIP retrieval with ``negative_all_rank``, BLIP-2's Q-Former, ALPRO; CLIP's ``loss`` property (it builds its
    ``ClipLoss`` from ``dist.get_world_size()``). Nothing changes once a group exists.
    """
    import lavis.models.alpro_models.alpro_retrieval as alpro_retrieval
    import lavis.models.base_model as base_model
    import lavis.models.blip2_models.blip2_qformer as blip2_qformer
    import lavis.models.blip_models.blip_retrieval as blip_retrieval
    import lavis.models.clip_models.model as clip_model
    import lavis.runners.runner_base as runner_base
    import lavis.runners.runner_iter as runner_iter

    if getattr(base_model, "_lavis_accel_single_process", False):
        return
    for module in (runner_base, runner_iter, blip2_qformer):
        module.dist = _SingleProcessDistributed(module.dist)
    gather = _gather_with_grad_if_distributed(base_model.all_gather_with_grad)
    for module in (base_model, blip_retrieval, blip2_qformer, alpro_retrieval):
        module.all_gather_with_grad = gather
    clip_model.CLIP.loss = property(_single_process_clip_loss(clip_model.CLIP.loss.fget))
    base_model._lavis_accel_single_process = True


def _single_process_clip_loss(stock_loss):
    """CLIP's ``loss`` property, with a one-process ``ClipLoss`` when no process group exists (LAVIS asks
    ``dist.get_world_size()``, which fails without one)."""
    import torch.distributed as dist
    from lavis.models.clip_models.loss import ClipLoss

    @functools.wraps(stock_loss)
    def loss(self):
        if self._loss is None and not (dist.is_available() and dist.is_initialized()):
            self._loss = ClipLoss(world_size=1, rank=0, local_loss=False, gather_with_grad=False, use_horovod=False)
        return stock_loss(self)

    return loss


def enable_cpu_runner():
    """Let LAVIS's ``RunnerBase`` train and evaluate on CPU (``device: cpu``; one process, or several: see
    ``enable_cpu_distributed``).

    Fixes, each only where stock LAVIS 1.0.2 would crash:
    1. ``RunnerBase.model`` returns None when the model already sits on the run device: return the model, wrapped
       in DDP when distributed (with no ``device_ids``, as a CPU module requires; LAVIS passes ``[run.gpu]``).
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
        if wrapped is None:  # LAVIS wraps the model only while moving it to the run device
            self._wrapped_model = runner_base.DDP(self._model) if self.use_distributed else self._model
            wrapped = self._wrapped_model
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


def _launched_distributed():
    """True when torchrun (``RANK``, ``WORLD_SIZE``) or SLURM (``SLURM_PROCID``) started this process (LAVIS's test)."""
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or "SLURM_PROCID" in os.environ


def _init_gloo_process_group(args, setup_for_distributed):
    """LAVIS's ``init_distributed_mode`` for processes without a GPU: gloo instead of nccl, no CUDA device to select.

    Sets the same run config fields as LAVIS (``rank``, ``world_size``, ``gpu`` = the local rank, ``distributed``,
    ``dist_backend``), waits at a barrier and leaves printing to rank 0. Under SLURM, as in LAVIS, ``world_size``
    comes from the config.
    """
    import torch.distributed as dist

    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        args.rank, args.world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        args.gpu = int(env.get("LOCAL_RANK", 0))
    else:
        args.rank, args.gpu = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0))
    args.distributed = True
    args.dist_backend = "gloo"
    print(f"| distributed init (rank {args.rank}, world {args.world_size}): {args.dist_url} (gloo, CPU)", flush=True)
    dist.init_process_group(backend="gloo", init_method=args.dist_url, world_size=args.world_size, rank=args.rank)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


class _HostTensors:
    """``torch`` as LAVIS's ``logger`` module sees it without CUDA: ``torch.tensor(..., device="cuda")`` stays on the
    host. ``SmoothedValue.synchronize_between_processes`` builds its all-reduce buffer there; gloo reduces it."""

    def __init__(self, torch):
        self._torch = torch

    def tensor(self, *args, device=None, **kwargs):
        return self._torch.tensor(*args, device=None if device == "cuda" else device, **kwargs)

    def __getattr__(self, name):
        return getattr(self._torch, name)


def enable_cpu_distributed():
    """Let ``torchrun --nproc_per_node N`` run LAVIS's runner in N CPU processes, e.g. to rehearse a cluster job.

    LAVIS's ``init_distributed_mode`` always selects a CUDA device and the nccl backend. When the process was
    launched distributed and CUDA is absent (or ``run.device`` is cpu), a gloo process group is set up instead;
    otherwise LAVIS's function runs unchanged. Without CUDA, the training-loss average that LAVIS's ``MetricLogger``
    all-reduces across ranks is built on the host. (DDP without ``device_ids``, host loaders and host batches:
    ``enable_cpu_runner``.) Idempotent.
    """
    import torch
    import lavis.common.dist_utils as dist_utils
    import lavis.common.logger as lavis_logger

    if getattr(dist_utils, "_lavis_accel_cpu_distributed", False):
        return
    stock_init = dist_utils.init_distributed_mode

    @functools.wraps(stock_init)
    def init_distributed_mode(args):
        on_host = not torch.cuda.is_available() or str(getattr(args, "device", "cuda")) == "cpu"
        if on_host and _launched_distributed():
            return _init_gloo_process_group(args, dist_utils.setup_for_distributed)
        return stock_init(args)

    dist_utils.init_distributed_mode = init_distributed_mode
    if not torch.cuda.is_available():
        lavis_logger.torch = _HostTensors(lavis_logger.torch)
    dist_utils._lavis_accel_cpu_distributed = True
