"""Dataset builders of sentences without images (P-Former's stage 0), registered into LAVIS's registry on import:

- ``laion_sentence_115m`` (the reference's name, so its project yamls work) and ``sentences`` (the same reader under
  a generic name, with no default file: a second corpus can then be trained alongside the first, LAVIS concatenating
  the two): a map-style train split read from ``build_info.annotations.train.storage``, one file or a list, each a
  JSON list of ``{"caption"}`` objects, a JSON list of strings or a ``.txt`` file of lines (``sentences.py``).
  As in LAVIS, relative paths are under ``cache_root`` and a missing file is fetched from its ``url``: downloaded
  from a remote one, copied from a local file (a path as given, or under ``cache_root``).
- ``sentence_shards``: sentences streamed from webdataset tar shards (``<key>.txt``, or the ``caption`` of
  ``<key>.json``: img2dataset's image-text shards are read for their captions), for LAVIS's ``runner_iter``, with the
  shard checks and per-rank, per-worker shares of ``image_text_shards``.

Items are ``{"text_input": text_processor(sentence)}``. These builders read no visual data: they need no
``vis_processor`` and no image folder, and an ``images`` entry a reference yaml may carry is ignored (``data_type``
is ``text`` whatever the yaml says, so the plugin's image checks pass them by).
"""
import logging
import os
import shutil

import webdataset as wds
from torchvision.datasets.utils import download_url

from lavis.common.utils import get_cache_path
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder, load_dataset_config
from lavis_accel.configs import packaged_dataset_config
from lavis_accel.datasets.builders import ImageTextShardsBuilder, _job_run_config
from lavis_accel.datasets.sentences import NAME, SHARDS_NAME, SentenceDataset, SentenceShards
from lavis_accel.datasets.shards import DEFAULT_SHUFFLE_BUFFER, check_share
from lavis_accel.errors import SettingError
from lavis_accel.registration import register_builder

logger = logging.getLogger(__name__)

TEXT = "text"  # the data_type of these builders: build_info has no visual entry to look up


def _as_list(value):
    return [value] if isinstance(value, str) else list(value or [])


def _is_remote(url):
    return "://" in url


def _local_source(url):
    """The local file ``url`` names: as given (relative to the working directory, as LAVIS reads it), else under
    ``cache_root``; None when neither exists."""
    for path in (url, get_cache_path(url)):
        if os.path.isfile(path):
            return path
    return None


def _own_urls(train, default_train):
    """The urls of the train split, without the default yaml's url when the project names its own storage: that url
    fetches the default file (LAVIS's merge would keep it under any storage, e.g. download LAION-115M into a
    mistyped path of one's own)."""
    urls, default_urls = _as_list(train.get("url")), _as_list(default_train.get("url"))
    own_storage = _as_list(train.get("storage")) != _as_list(default_train.get("storage"))
    return [] if default_urls and urls == default_urls and own_storage else urls


def annotation_sources(name, dataset_cfg, default_train=None):
    """``[(url or None, storage path)]`` of the train split of a sentence dataset config, checked before any work:
    a train split only, one url per storage file when urls are given, and each storage file present or fetchable
    (a remote url, or a local file to copy). ``default_train``: the builder's default ``annotations.train``."""
    where = f"datasets.{name}.build_info.annotations"
    annotations = (dataset_cfg.get("build_info") or {}).get("annotations") or {}
    others = [split for split in annotations if split != "train"]
    if others:
        raise SettingError(f"{where}: {name} has a train split only (language-only pretraining evaluates nothing), "
                           f"not {', '.join(others)}")
    train = annotations.get("train")
    storages = _as_list(train.get("storage")) if train is not None else []
    if not storages:
        raise SettingError(f"{where}.train.storage: names no sentence file: give a .json or .txt file or a list")
    urls = _own_urls(train, default_train or {})
    if urls and len(urls) != len(storages):
        raise SettingError(f"{where}.train: {len(urls)} url(s) for {len(storages)} storage file(s): give one url per "
                           "file, or url: null")
    sources = []
    for url, storage in zip(urls or [None] * len(storages), storages):
        if not isinstance(storage, str) or not storage.strip():
            raise SettingError(f"{where}.train.storage: {storage!r} is not a file path")
        path = storage if os.path.isabs(storage) else get_cache_path(storage)
        if os.path.isdir(path):
            raise SettingError(f"{where}.train.storage: {path} is a folder, not a sentence file")
        if not os.path.exists(path):
            if not url:
                raise SettingError(f"{where}.train.storage: {path} does not exist (and no url is given to fetch it)")
            if not _is_remote(url) and _local_source(url) is None:
                raise SettingError(f"{where}.train.url: {url} is neither a local file nor a url (e.g. https://...), "
                                   f"and {path} does not exist")
        sources.append((url, path))
    return sources


def fetch(url, path, where):
    """Put the file ``url`` names at ``path``: copied from a local file, else downloaded (LAVIS's downloader)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    local = _local_source(url)
    try:
        if local is not None:
            shutil.copyfile(local, path)
        else:
            download_url(url=url, root=os.path.dirname(path), filename=os.path.basename(path))
    except Exception as err:  # noqa: BLE001  (a network or disk failure: one line naming the file)
        if os.path.exists(path):
            os.remove(path)  # a partial file would be read as the whole one next time
        raise SettingError(f"{where}: {url} could not be fetched to {path}: {type(err).__name__}: "
                           f"{' '.join(str(err).split())[:200]}") from err
    if not os.path.isfile(path):
        raise SettingError(f"{where}: fetching {url} left no file at {path}")


@register_builder(NAME)
class SentenceBuilder(BaseDatasetBuilder):
    """Sentences from annotation files (see the module doc): a train split of ``{"text_input"}`` items."""

    NAME = NAME
    READS_VISUAL = False  # no image folder to check (see lavis_accel.config_checks)
    train_dataset_cls = SentenceDataset
    DATASET_CONFIG_DICT = {"default": packaged_dataset_config(NAME)}

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.data_type = TEXT

    @classmethod
    def default_train(cls):
        """``annotations.train`` of the builder's default yaml."""
        return load_dataset_config(cls.default_config_path()).build_info.annotations.train

    @classmethod
    def sources(cls, name, dataset_cfg):
        return annotation_sources(name, dataset_cfg, cls.default_train())

    @classmethod
    def check_paths(cls, name, dataset_cfg):
        """The sentence files of a merged ``datasets.<name>`` config, checked to be there or fetchable."""
        return [path for _, path in cls.sources(name, dataset_cfg)]

    def _download_ann(self):
        """Fetch each missing file from its url (main process only: LAVIS's ``build_datasets`` calls this there)."""
        for url, path in self.sources(self.NAME, self.config):
            if not os.path.exists(path):
                logger.info("datasets.%s: fetching %s to %s", self.NAME, url, path)
                fetch(url, path, f"datasets.{self.NAME}.build_info.annotations.train.url")

    def _download_vis(self):
        """No visual data."""

    def build(self):
        self.build_processors()
        paths = self.check_paths(self.NAME, self.config)
        run_cfg = _job_run_config(self, self.NAME) or {}
        dataset = self.train_dataset_cls.from_files(
            paths, self.text_processors["train"], f"datasets.{self.NAME}.build_info.annotations.train.storage",
            run_cfg.get("on_bad_sample", "error"))
        logger.info("datasets.%s: %d sentences", self.NAME, len(dataset))
        return {"train": dataset}


@register_builder("sentences")
class GenericSentenceBuilder(SentenceBuilder):
    """``laion_sentence_115m``'s reader under a generic name, with no default file."""

    NAME = "sentences"
    DATASET_CONFIG_DICT = {"default": packaged_dataset_config("sentences")}


@register_builder(SHARDS_NAME)
class SentenceShardsBuilder(ImageTextShardsBuilder):
    """A train split of sentences streamed from tar shards: ``image_text_shards``' storage, checks, shares and
    ``shuffle_buffer``, without images."""

    NAME = SHARDS_NAME
    READS_VISUAL = False
    train_dataset_cls = SentenceShards
    DATASET_CONFIG_DICT = {"default": packaged_dataset_config(SHARDS_NAME)}

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.data_type = TEXT

    def build(self):
        self.build_processors()
        where = f"datasets.{self.NAME}.build_info.storage"
        urls = self.check_paths(self.NAME, self.config)
        run_cfg = _job_run_config(self, self.NAME) or {}
        _, world_size, _, _ = wds.utils.pytorch_worker_info()
        check_share(len(urls), world_size, run_cfg.get("num_workers", 0), where)
        dataset = self.train_dataset_cls(
            urls, self.text_processors["train"], seed=run_cfg.get("seed", 0),
            shuffle_buffer=self.config.build_info.get("shuffle_buffer", DEFAULT_SHUFFLE_BUFFER),
            on_bad_sample=run_cfg.get("on_bad_sample", "error"), name=self.NAME)
        dataset.first_sample()
        return {"train": dataset}
