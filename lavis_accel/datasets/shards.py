"""Image-text pairs streamed from webdataset tar shards in img2dataset's output layout, on any number of nodes.

img2dataset writes shards ``00000.tar``, ``00001.tar``, ... each holding, per sample, ``<key>.jpg`` and ``<key>.txt``
(the caption) and/or ``<key>.json`` (metadata with a ``"caption"`` field). :class:`ImageTextShards` reads them as a
``webdataset.DataPipeline``, the kind of dataset LAVIS's ``runner_iter`` chains and streams (as LAVIS's LAION
dataset): each sample is ``{"image": vis_processor(image), "text_input": text_processor(caption)}``.

Sharding over nodes and workers: every pass over the data shuffles the shard list with a seed all ranks share (so
each pass assigns shards differently), gives rank ``r`` of ``R`` the shards ``r, r + R, ...`` of that order and,
inside a rank, DataLoader worker ``w`` of ``W`` every ``W``-th of those. The ``R x W`` shares of a pass are disjoint
and together hold every shard once. For training the stream repeats pass after pass without end, so no rank runs dry
before another (LAVIS's iteration-based runner takes a fixed number of batches per inner epoch). Samples are then
shuffled in a buffer seeded per rank and worker, so a run's order is reproducible.

``write_scene_shards`` writes the synthetic scenes of ``lavis_accel.datasets`` in that layout, for tests and
dry-runs.
"""
import io
import json
import logging
import os
import random
import tarfile

import webdataset as wds
from webdataset.shardlists import expand_urls

from lavis.common.utils import get_cache_path
from lavis_accel.datasets.language import captions
from lavis_accel.datasets.scenes import MIN_IMAGE_SIZE, generate_scenes, render
from lavis_accel.errors import SettingError

logger = logging.getLogger(__name__)

NAME = "image_text_shards"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode_format choices
DEFAULT_SHUFFLE_BUFFER = 1000  # LAVIS's LAION pipeline shuffles in a buffer of 1000 samples
_JPEG_QUALITY = 95
_KEY_DIGITS = 4  # img2dataset: a sample's key is its shard number followed by its index in the shard


def _is_remote(url):
    """Whether webdataset opens ``url`` itself (``pipe:``, ``http://``, ``s3://`` ...): no local file to check."""
    return url.startswith("pipe:") or "://" in url


def shard_urls(storage, where=f"datasets.{NAME}.build_info.storage"):
    """The shards ``storage`` names, in order: a path, a brace pattern (``/data/cc3m/{00000..00331}.tar``) or a
    list of them. Relative paths are taken under LAVIS's ``cache_root``, as LAVIS does for every dataset path."""
    patterns = [storage] if isinstance(storage, str) else list(storage or [])
    urls = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise SettingError(f"{where}: {pattern!r} is not a shard path or pattern (e.g. /data/cc3m/"
                               "{00000..00331}.tar)")
        urls += expand_urls(pattern.strip())
    if not urls:
        raise SettingError(f"{where}: names no shard: give a shard path, a brace pattern such as "
                           "/data/cc3m/{00000..00331}.tar, or a list of them")
    return [url if _is_remote(url) or os.path.isabs(url) else get_cache_path(url) for url in urls]


def check_shards(urls, where=f"datasets.{NAME}.build_info.storage"):
    """Every local shard must be a file, and none may be named twice (its samples would count double)."""
    seen = set()
    for url in urls:
        if url in seen:
            raise SettingError(f"{where}: shard {url} is named twice")
        seen.add(url)
    for url in urls:
        if _is_remote(url):
            continue
        if not os.path.exists(url):
            raise SettingError(f"{where}: shard {url} does not exist")
        if not os.path.isfile(url):
            raise SettingError(f"{where}: shard {url} is not a file")


def check_share(n_shards, world_size, num_workers, where=f"datasets.{NAME}.build_info.storage"):
    """Every rank's every DataLoader worker needs at least one shard per pass, else it would stream nothing."""
    readers = world_size * max(1, num_workers)
    if n_shards < readers:
        raise SettingError(f"{where}: {n_shards} shard(s) for {world_size} rank(s) x {max(1, num_workers)} data "
                           f"loader worker(s): each reads whole shards, so give at least {readers} shards "
                           "(or lower run.num_workers)")


def shard_share(urls, rank, world_size, worker, num_workers, *, seed=0, epoch=0, shuffle=True):
    """The shards reader ``(rank, worker)`` streams in pass ``epoch``: the pass's order (shuffled with ``seed`` and
    ``epoch`` when ``shuffle``, the same on every rank), every ``world_size``-th from ``rank``, then every
    ``num_workers``-th of those from ``worker``."""
    order = list(urls)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[rank::world_size][worker::max(1, num_workers)]


class ShardSource:
    """The first stage of the pipeline: ``{"url": shard}`` for this reader's share, pass after pass.

    Ranks and workers come from ``webdataset.utils.pytorch_worker_info`` (``RANK``/``WORLD_SIZE`` as torchrun sets
    them, else the process group; the DataLoader's worker info), read when iteration starts, inside the worker.
    ``passes=None`` repeats forever (training); a number stops after that many passes. ``split=False`` reads every
    shard in this process (a check).
    """

    def __init__(self, urls, *, seed=0, shuffle=True, passes=None, split=True):
        self.urls, self.seed, self.shuffle, self.passes, self.split = list(urls), seed, shuffle, passes, split

    def __call__(self):
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info() if self.split else (0, 1, 0, 1)
        epoch = 0
        while self.passes is None or epoch < self.passes:
            share = shard_share(self.urls, rank, world_size, worker, num_workers, seed=self.seed, epoch=epoch,
                                shuffle=self.shuffle)
            if not share:
                raise SettingError(f"datasets.{NAME}: rank {rank} worker {worker} of {world_size} x {num_workers} "
                                   f"readers gets none of the {len(self.urls)} shards")
            for url in share:
                yield {"url": url}
            epoch += 1


class SeededShuffle:
    """webdataset's buffer shuffle, with a generator seeded by the run's seed, the rank and the worker (webdataset
    seeds it from the process id and the clock, so no two runs would see the same order)."""

    def __init__(self, buffer_size, seed=0):
        self.buffer_size, self.seed = buffer_size, seed

    def __call__(self, samples):
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}:{rank}:{worker}")
        return wds.shuffle(self.buffer_size, min(100, self.buffer_size), rng=rng)(samples)


class BadSamples:
    """What a bad sample or shard does (``run.on_bad_sample``): ``error`` stops with one line naming it, ``skip``
    logs it and reads on (webdataset's handler protocol: return True to continue)."""

    def __init__(self, on_bad_sample="error", where=f"datasets.{NAME}"):
        self.on_bad_sample, self.where = on_bad_sample, where

    def __call__(self, exn):
        if isinstance(exn, SettingError):
            message = str(exn)
        else:
            details = " ".join(" ".join(str(a).split()) for a in exn.args if a is not None and str(a).strip())
            message = f"{self.where}: {type(exn).__name__}: {details[:300]}"
        if self.on_bad_sample == "skip":
            logger.warning("skipped: %s", message)
            return True
        raise SettingError(f"{message} (run.on_bad_sample=skip leaves bad samples out)") from exn


def sample_caption(sample):
    """The caption of a decoded sample: ``<key>.txt``, else the ``caption`` of ``<key>.json``; None if neither."""
    text = sample.get("txt")
    if isinstance(text, str):
        return text
    meta = sample.get("json")
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return caption if isinstance(caption, str) else None


def sample_image(sample):
    """The decoded image of a sample (img2dataset writes .jpg, or .png/.webp with another encode_format)."""
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)


class ImageTextShards(wds.DataPipeline):
    """Image-text pairs from tar shards, as ``{"image", "text_input"}`` through the dataset's processors.

    A ``webdataset.DataPipeline``, so LAVIS's runners chain it (``concat_datasets``) and stream it without a
    sampler. ``shuffle`` shuffles the shard order of each pass and the samples in a buffer of ``shuffle_buffer``;
    ``passes=None`` streams without end (training). ``on_bad_sample``: ``error`` or ``skip`` (see ``BadSamples``).
    """

    def __init__(self, urls, vis_processor, text_processor, *, seed=0, shuffle=True,
                 shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, passes=None, on_bad_sample="error"):
        self.urls = list(urls)
        self.vis_processor, self.text_processor = vis_processor, text_processor
        self.handler = BadSamples(on_bad_sample)
        source = ShardSource(self.urls, seed=seed, shuffle=shuffle, passes=passes)
        shuffling = SeededShuffle(shuffle_buffer, seed) if shuffle and shuffle_buffer > 1 else None
        super().__init__(source, *self.sample_stages(self.handler, shuffling))

    def sample_stages(self, handler, shuffling=None):
        """The stages from shard urls to processed samples (``shuffling`` between reading and decoding)."""
        return [wds.tarfile_to_samples(handler=handler), shuffling,
                wds.decode("pilrgb", handler=handler), wds.map(self.to_dict, handler=handler)]

    def to_dict(self, sample):
        """``{"image", "text_input"}`` of one decoded sample, as LAVIS's pretraining datasets give them."""
        image, caption = sample_image(sample), sample_caption(sample)
        where = f"datasets.{NAME}: sample {sample.get('__key__')} of shard {sample.get('__url__')}"
        if image is None:
            raise SettingError(f"{where} has no image ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
        if caption is None:
            raise SettingError(f"{where} has no caption (a .txt file, or a .json file with a \"caption\" string)")
        return {"image": self.vis_processor(image), "text_input": self.text_processor(caption)}

    def first_sample(self):
        """The first sample of the first shard through the processors, read in this process: a check before
        work that the shards hold readable samples and the processors' settings work on them. A bad first sample
        is an error whatever ``run.on_bad_sample`` says: if every sample failed, skipping would stream forever."""
        first_shard = ShardSource(self.urls[:1], shuffle=False, passes=1, split=False)
        for sample in wds.DataPipeline(first_shard, *self.sample_stages(BadSamples("error"))):
            return sample
        raise SettingError(f"datasets.{NAME}.build_info.storage: shard {self.urls[0]} holds no sample")


def scene_samples(n, shard_size, seed=0):
    """``[(shard, key, scene, caption)]`` of the synthetic shards: img2dataset's keys (shard number, then index),
    one caption per image, its phrasings taken in turn."""
    samples = []
    for index, scene in enumerate(generate_scenes(n, seed)):
        shard, position = divmod(index, shard_size)
        phrasings = captions(scene)
        samples.append((shard, f"{shard:05d}{position:0{_KEY_DIGITS}d}", scene, phrasings[index % len(phrasings)]))
    return samples


def _add_file(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: the same scenes give the same bytes
    tar.addfile(info, io.BytesIO(data))


def _jpeg(scene, image_size):
    buffer = io.BytesIO()
    render(scene, image_size).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def write_tar_shards(directory, samples, files):
    """Write ``samples`` (``scene_samples``' ``(shard, key, scene, caption)``) as ``<directory>/00000.tar``, ...,
    each sample's members from ``files(key, scene, caption)`` (``[(name, bytes), ...]``); the brace pattern that
    names the shards."""
    os.makedirs(directory, exist_ok=True)
    n_shards = samples[-1][0] + 1
    for shard in range(n_shards):
        with tarfile.open(os.path.join(directory, f"{shard:05d}.tar"), "w") as tar:
            for _, key, scene, caption in [s for s in samples if s[0] == shard]:
                for name, data in files(key, scene, caption):
                    _add_file(tar, name, data)
    return os.path.join(directory, f"{{00000..{n_shards - 1:05d}}}.tar")


def write_scene_shards(root, n=200, shard_size=50, image_size=96, seed=0, txt=True):
    """Write ``n`` synthetic scenes as img2dataset tar shards under ``<root>/image_text_shards/`` and return the
    ``datasets:`` entry of ``image_text_shards`` that streams them (a brace pattern over the shards).

    Each sample is ``<key>.jpg`` and ``<key>.json`` (img2dataset's metadata, caption included) and, when ``txt``,
    ``<key>.txt``; with ``txt=False`` the caption is in the ``.json`` only.
    """
    for label, value in (("n", n), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer of at least {MIN_IMAGE_SIZE} pixels, got {image_size!r}")
    def files(key, scene, caption):
        meta = {"url": f"synthetic://scenes/{seed}/{key}", "key": key, "caption": caption,
                "status": "success", "error_message": None, "width": image_size, "height": image_size,
                "original_width": image_size, "original_height": image_size}
        text = [(f"{key}.txt", caption.encode("utf-8"))] if txt else []
        return [(f"{key}.jpg", _jpeg(scene, image_size)), *text, (f"{key}.json", json.dumps(meta).encode("utf-8"))]

    storage = write_tar_shards(os.path.join(os.path.abspath(root), NAME), scene_samples(n, shard_size, seed), files)
    image_processor = {"name": "blip_image_eval", "image_size": image_size}  # see synthetic.py: no crops, no flips
    return {NAME: {
        "data_type": "images",
        "build_info": {"storage": storage},
        "vis_processor": {"train": dict(image_processor), "eval": dict(image_processor)},
        "text_processor": {"train": {"name": "blip_caption"}, "eval": {"name": "blip_caption"}},
    }}
