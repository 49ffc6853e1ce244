"""Dataset builders LAVIS 1.0.2 lacks, registered into its registry under the names a project yaml's ``datasets:``
uses (registered when ``lavis_accel.datasets`` is imported):

- ``image_text_shards``: image-text pairs streamed from webdataset tar shards in img2dataset's layout
  (``shards.ImageTextShards``), on any number of nodes, for LAVIS's iteration-based runner (``runner: runner_iter``
  with ``max_iters`` and ``iters_per_inner_epoch``, as LAVIS's LAION configs). ``build_info.storage``: a shard, a
  brace pattern or a list of them; ``build_info.shuffle_buffer``: samples shuffled in a buffer (default 1000).
- ``flickr30k_caption``: Flickr30k captioning on the Karpathy split, in the annotation format of ``coco_caption``
  (train entries ``{image, caption, image_id}``, val/test entries ``{image, caption: [...]}``). LAVIS's own
  Flickr30k retrieval files have exactly that format, so the default config reads (and downloads) those. Evaluate
  with the task ``captioning_own_gt``: LAVIS's ``captioning`` scores against COCO's ground truth.
"""
import os

import webdataset as wds
from omegaconf import OmegaConf

from lavis.common.registry import registry
from lavis.common.utils import get_cache_path
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.datasets.coco_caption_datasets import COCOCapDataset, COCOCapEvalDataset
from lavis.tasks.captioning import CaptionTask
from lavis_accel.checkpoints import rng_state, set_rng_state
from lavis_accel.datasets.shards import (
    DEFAULT_SHUFFLE_BUFFER, ImageTextShards, check_share, check_shards, shard_urls,
)
from lavis_accel.configs import packaged_dataset_config
from lavis_accel.errors import SettingError
from lavis_accel.registration import register_builder


def _job_run_config(builder, name):
    """The run config of the job building ``builder`` (LAVIS's ``Config`` registers itself), or None when the builder
    is not building that job's ``datasets.<name>`` (built from Python, or a config left from an earlier job)."""
    config = registry.get("configuration", no_warning=True)
    datasets_cfg = getattr(config, "datasets_cfg", None)
    if datasets_cfg is None or datasets_cfg.get(name) is not builder.config:
        return None
    return config.run_cfg


@register_builder("image_text_shards")
class ImageTextShardsBuilder(BaseDatasetBuilder):
    """A train split streamed from img2dataset tar shards (see ``lavis_accel.datasets.shards``).

    Before any sample is read: every local shard the storage names must exist, and there must be a shard for each
    rank's each DataLoader worker; then the first sample is read through the processors (one-line errors).
    """

    NAME = "image_text_shards"
    STREAMED = True  # no length: trained by runner_iter only (lavis_accel.run_checks)
    train_dataset_cls = ImageTextShards
    DATASET_CONFIG_DICT = {"default": packaged_dataset_config("image_text_shards")}

    @classmethod
    def check_paths(cls, name, dataset_cfg):
        """The shards of a merged ``datasets.<name>`` config, checked to exist (for a check before the job starts)."""
        where = f"datasets.{name}.build_info.storage"
        urls = shard_urls(dataset_cfg.get("build_info", {}).get("storage"), where)
        check_shards(urls, where)
        return urls

    def _download_ann(self):
        """Shards are never downloaded: webdataset streams local files or urls (``pipe:``, ``http://``) as given."""

    def _download_vis(self):
        """No image folder: the images are inside the shards."""

    def build(self):
        self.build_processors()
        urls = self.check_paths(self.NAME, self.config)
        run_cfg = _job_run_config(self, self.NAME) or {}
        _, world_size, _, _ = wds.utils.pytorch_worker_info()
        check_share(len(urls), world_size, run_cfg.get("num_workers", 0), f"datasets.{self.NAME}.build_info.storage")
        dataset = self.train_dataset_cls(
            urls, self.vis_processors["train"], self.text_processors["train"], seed=run_cfg.get("seed", 0),
            shuffle_buffer=self.config.build_info.get("shuffle_buffer", DEFAULT_SHUFFLE_BUFFER),
            on_bad_sample=run_cfg.get("on_bad_sample", "error"))
        state = rng_state()  # the training processor's random crops must not shift the run's random numbers
        try:
            dataset.first_sample()
        finally:
            set_rng_state(state)
        return {"train": dataset}


def _split_storage(info):
    storage = info.get("storage")
    return [storage] if isinstance(storage, str) else list(storage or [])


@register_builder("flickr30k_caption")
class Flickr30kCaptionBuilder(BaseDatasetBuilder):
    """Flickr30k Karpathy captioning, read with LAVIS's COCO caption dataset classes (same annotation format; the
    evaluation image id is the file name's number, as for COCO)."""

    train_dataset_cls = COCOCapDataset
    eval_dataset_cls = COCOCapEvalDataset
    DATASET_CONFIG_DICT = {"default": packaged_dataset_config("flickr30k_caption")}

    def _download_ann(self):
        """LAVIS's download, for the splits whose annotations name a ``url``; a split without one must already have
        its files (LAVIS's own download fails on a missing url with ``len(None)``)."""
        annotations = self.config.build_info.annotations
        local = [split for split in annotations if not annotations[split].get("url")]
        for split in local:
            for path in _split_storage(annotations[split]):
                resolved = path if os.path.isabs(path) else get_cache_path(path)
                if not os.path.exists(resolved):
                    raise SettingError(f"datasets.flickr30k_caption.build_info.annotations.{split}.storage: "
                                       f"{resolved} does not exist (and no url is given to download it from)")
        if len(local) == len(annotations):
            return
        full = self.config
        self.config = OmegaConf.create(OmegaConf.to_container(full, resolve=True))
        for split in local:
            del self.config.build_info.annotations[split]
        try:
            super()._download_ann()
        finally:
            self.config = full

    def build(self):
        _refuse_coco_ground_truth(_job_run_config(self, "flickr30k_caption"), "flickr30k_caption")
        return super().build()


def _refuse_coco_ground_truth(run_cfg, name):
    """LAVIS's ``captioning`` task scores every dataset against COCO's Karpathy ground truth (``cache_root/coco_gt``):
    a run evaluating another dataset with it would fail, or score wrongly, after training. Refused before work."""
    if run_cfg is None or registry.get_task_class(run_cfg.get("task")) is not CaptionTask:
        return
    evaluated = list(run_cfg.get("valid_splits") or []) + list(run_cfg.get("test_splits") or [])
    if evaluated and run_cfg.get("report_metric", True):
        raise SettingError(f"run.task captioning scores {name} against COCO's ground truth (cache_root/coco_gt): "
                           "use run.task captioning_own_gt, which scores against the dataset's own captions")
