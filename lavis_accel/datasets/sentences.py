"""Sentences without images, for P-Former's language-only stage 0: read from annotation files or tar shards.

Two sources, each item ``{"text_input": text_processor(sentence)}`` (P-Former's stage 0 reads nothing else; the
"\\n" the OPT pipeline appends is the model's business, not the data's):

- :class:`SentenceDataset`, map-style, from annotation files in one of three formats: a JSON list of
  ``{"caption": str}`` objects (the reference's format, BLIP's ``laion_synthetic_filtered_large.json``; other fields
  are ignored), a JSON list of strings, or a ``.txt`` file with one sentence per line (blank lines skipped). A file
  is read as text lines when its name ends in ``.txt``, else as JSON. Only the sentences are kept in memory (plain
  strings, not LAVIS's annotation dicts: the LAION file holds 115M of them).
- :class:`SentenceShards`, streamed, from webdataset tar shards whose samples hold a sentence as ``<key>.txt`` (or
  as the ``caption`` of ``<key>.json``, so img2dataset's image-text shards can be read for their captions alone;
  their images are never decoded). Ranks, workers, passes and shuffling are those of ``shards.ImageTextShards``.

Bad input is one line naming the file (and the entry): a file that cannot be read, a JSON file in neither format,
a file without sentences. ``on_bad_sample="skip"`` leaves bad entries (not strings, no ``caption`` string, blank)
out, logging the first few and the count, as ``run.on_bad_sample`` does for LAVIS's datasets.

``write_sentences`` and ``write_sentence_shards`` write the captions of the synthetic scenes (``scenes.py``,
``language.py``) in these layouts, so stage 0 learns the language the synthetic image-text data speaks.
"""
import logging
import os

import webdataset as wds

from lavis.datasets.datasets.base_dataset import BaseDataset
from lavis_accel.checkpoints import rng_state, set_rng_state
from lavis_accel.data_checks import load_json_file
from lavis_accel.datasets.shards import (
    DEFAULT_SHUFFLE_BUFFER, BadSamples, SeededShuffle, ShardSource, sample_caption, scene_samples, write_tar_shards,
)
from lavis_accel.datasets.synthetic import _local, _write_json
from lavis_accel.errors import SettingError

logger = logging.getLogger(__name__)

NAME = "laion_sentence_115m"  # the reference's builder name
SHARDS_NAME = "sentence_shards"
FORMATS = {"json": "sentences.json", "strings": "sentence_list.json", "txt": "sentences.txt"}
_SHOWN = 5  # bad entries logged one by one before only the count is


def _entry_sentence(entry):
    """``(sentence, problem)`` of one JSON entry: a string, or an object with a ``caption`` string."""
    if isinstance(entry, str):
        sentence = entry
    elif isinstance(entry, dict):
        sentence = entry.get("caption")
        if not isinstance(sentence, str):
            found = "no 'caption'" if "caption" not in entry else f"a {type(sentence).__name__} 'caption'"
            return None, f"is an object with {found}, not a 'caption' string"
    else:
        return None, f"is a {type(entry).__name__}, not a string or an object with a 'caption' string"
    if not sentence.strip():
        return None, "is a blank sentence"
    return sentence, None


def _load_json(path, where):
    entries = load_json_file(path, where, hint="; a sentence file is a JSON list, or a .txt file with one sentence "
                                                "per line")
    if not isinstance(entries, list):
        raise SettingError(f"{where}: {path} holds a JSON {type(entries).__name__}: a sentence file holds a JSON list "
                           "of {\"caption\": sentence} objects or of sentence strings")
    return entries


def _json_sentences(path, where, on_bad_sample):
    """The sentences of a JSON sentence file; bad entries stop the read or are left out (``on_bad_sample``)."""
    entries = _load_json(path, where)
    sentences, bad = [], []
    for index, entry in enumerate(entries):
        sentence, problem = _entry_sentence(entry)
        if problem is None:
            sentences.append(sentence)
            continue
        message = f"{where}: {path} entry {index} {problem}"
        if on_bad_sample != "skip":
            raise SettingError(f"{message} (run.on_bad_sample=skip leaves bad entries out)")
        if len(bad) < _SHOWN:
            logger.warning("skipped: %s", message)
        bad.append(index)
    if bad:
        logger.warning("%s: skipped %d of %d entries of %s (run.on_bad_sample=skip)", where, len(bad), len(entries),
                       path)
    if entries and not sentences:
        raise SettingError(f"{where}: {path} holds no sentence: every entry is bad, e.g. entry {bad[0]} "
                           f"{_entry_sentence(entries[bad[0]])[1]}")
    return sentences


def _text_sentences(path, where):
    """The non-blank lines of a text file, stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise SettingError(f"{where}: {path} is not a text (UTF-8) file") from None
    except OSError as err:
        raise SettingError(f"{where}: {path} cannot be read: {err.strerror}") from None


def read_sentences(paths, where, on_bad_sample="error"):
    """Every sentence of the files ``paths``, in order (``.txt``: one per line; else JSON, see the module doc).
    ``where`` names the setting in errors; a file without a sentence is refused."""
    sentences = []
    for path in paths:
        if os.path.isdir(path):
            raise SettingError(f"{where}: {path} is a folder, not a sentence file")
        if not os.path.isfile(path):
            raise SettingError(f"{where}: {path} does not exist")
        if path.endswith(".txt"):
            found = _text_sentences(path, where)
        else:
            found = _json_sentences(path, where, on_bad_sample)
        if not found:
            raise SettingError(f"{where}: {path} holds no sentence")
        sentences += found
    return sentences


class SentenceDataset(BaseDataset):
    """Sentences as ``{"text_input": text_processor(sentence)}``, map-style (``annotation``: the sentences).

    A LAVIS ``BaseDataset`` for its collater and ``set_processors``; there is no visual processor."""

    def __init__(self, sentences, text_processor):
        super().__init__(vis_processor=None, text_processor=text_processor, vis_root=None, ann_paths=[])
        self.annotation = list(sentences)

    @classmethod
    def from_files(cls, paths, text_processor, where, on_bad_sample="error"):
        return cls(read_sentences(paths, where, on_bad_sample), text_processor)

    def __getitem__(self, index):
        return {"text_input": self.text_processor(self.annotation[index])}


class SentenceShards(wds.DataPipeline):
    """Sentences streamed from tar shards, as ``{"text_input"}`` (plus the ``__key__`` webdataset's map keeps).

    Shard shares per rank and DataLoader worker, passes (``passes=None``: without end), the seeded buffer shuffle and
    ``on_bad_sample`` are those of ``shards.ImageTextShards``; only ``.txt`` and ``.json`` members are decoded.
    ``name`` is the dataset's name in error messages.
    """

    def __init__(self, urls, text_processor, *, seed=0, shuffle=True, shuffle_buffer=DEFAULT_SHUFFLE_BUFFER,
                 passes=None, on_bad_sample="error", name=SHARDS_NAME):
        self.urls, self.text_processor, self.name = list(urls), text_processor, name
        self.handler = BadSamples(on_bad_sample, where=f"datasets.{name}")
        source = ShardSource(self.urls, seed=seed, shuffle=shuffle, passes=passes)
        shuffling = SeededShuffle(shuffle_buffer, seed) if shuffle and shuffle_buffer > 1 else None
        super().__init__(source, *self.sample_stages(self.handler, shuffling))

    def sample_stages(self, handler, shuffling=None):
        """The stages from shard urls to processed samples (``shuffling`` between reading and decoding)."""
        return [wds.tarfile_to_samples(handler=handler), shuffling,
                wds.decode(only=["txt", "json"], handler=handler), wds.map(self.to_dict, handler=handler)]

    def to_dict(self, sample):
        """``{"text_input"}`` of one decoded sample; a sample without a sentence, or a blank one, is bad."""
        sentence = sample_caption(sample)
        if sentence is None or not sentence.strip():
            where = f"datasets.{self.name}: sample {sample.get('__key__')} of shard {sample.get('__url__')}"
            problem = "has no sentence (a .txt file, or a .json file with a \"caption\" string)" if sentence is None \
                else "has a blank sentence"
            raise SettingError(f"{where} {problem}")
        return {"text_input": self.text_processor(sentence)}

    def first_sample(self):
        """The first sample of the first shard through the text processor, read in this process before work (a bad
        first sample is an error whatever ``on_bad_sample`` says: if every sample were bad, skipping would stream
        forever). The random state is left as it was."""
        first_shard = ShardSource(self.urls[:1], shuffle=False, passes=1, split=False)
        state = rng_state()
        try:
            for sample in wds.DataPipeline(first_shard, *self.sample_stages(BadSamples("error",
                                                                                       f"datasets.{self.name}"))):
                return sample
        finally:
            set_rng_state(state)
        raise SettingError(f"datasets.{self.name}.build_info.storage: shard {self.urls[0]} holds no sample")


def _check_count(label, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{label} must be a positive integer, got {value!r}")


def synthetic_sentences(n, seed=0):
    """``n`` captions of the synthetic scenes (one per scene, its phrasings in turn): the sentences of the scene
    shards with the same ``n`` and ``seed``."""
    return [caption for *_, caption in scene_samples(n, n, seed)]


def _text_processors():
    return {"train": {"name": "blip_caption"}, "eval": {"name": "blip_caption"}}


def write_sentences(root, n=200, fmt="json", seed=0, name=NAME):
    """Write ``n`` synthetic sentences under ``<root>/<name>/annotations/`` and return the ``datasets:`` entry of
    ``name`` (``laion_sentence_115m`` or ``sentences``) that reads them.

    ``fmt``: ``json`` (a list of ``{"caption"}`` objects, the reference's format), ``strings`` (a JSON list of
    strings) or ``txt`` (one sentence per line).
    """
    _check_count("n", n)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    sentences = synthetic_sentences(n, seed)
    path = os.path.join(os.path.abspath(root), name, "annotations", FORMATS[fmt])
    if fmt == "txt":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(sentence + "\n" for sentence in sentences))
    else:
        _write_json(path, [{"caption": s} for s in sentences] if fmt == "json" else sentences)
    return {name: {"data_type": "text", "build_info": {"annotations": {"train": _local(path)}},
                   "text_processor": _text_processors()}}


def write_sentence_shards(root, n=200, shard_size=50, seed=0):
    """Write ``n`` synthetic sentences as tar shards (``<key>.txt`` per sample, img2dataset's keys) under
    ``<root>/sentence_shards/`` and return the ``datasets:`` entry of ``sentence_shards`` that streams them."""
    _check_count("n", n)
    _check_count("shard_size", shard_size)
    storage = write_tar_shards(os.path.join(os.path.abspath(root), SHARDS_NAME), scene_samples(n, shard_size, seed),
                               lambda key, scene, sentence: [(f"{key}.txt", sentence.encode("utf-8"))])
    return {SHARDS_NAME: {"data_type": "text", "build_info": {"storage": storage},
                          "text_processor": _text_processors()}}
