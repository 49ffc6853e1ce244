"""P-Former's stage-0 data: sentences without images, read through LAVIS's own builders (``laion_sentence_115m``,
``sentences``, ``sentence_shards``) from the synthetic writers' files, each item ``{"text_input"}`` through the
``blip_caption`` processor; shards shared over ranks and workers as ``image_text_shards``; bad input refused in one
line naming the setting or the file before any work.
"""
import io
import itertools
import json
import os
import tarfile

import pytest
import torch
from omegaconf import OmegaConf

from lavis.common.config import Config
from lavis.common.registry import registry
from lavis.processors.blip_processors import BlipCaptionProcessor

from lavis_accel.config_checks import check_dataset_paths
from lavis_accel.data_checks import check_builder
from lavis_accel.datasets import set_cache_root
from lavis_accel.datasets.sentence_builders import SentenceShardsBuilder
from lavis_accel.datasets.sentences import (
    SentenceDataset, SentenceShards, synthetic_sentences, write_sentence_shards, write_sentences,
)
from lavis_accel.datasets.shards import scene_samples, shard_share, shard_urls
from lavis_accel.errors import SettingError
from lavis_accel.run_checks import check_streamed_datasets

N_SENTENCES, SHARD_SIZE = 10, 3  # four shards: 3, 3, 3 and 1 sentences
CAPTION = BlipCaptionProcessor()


def identity(x):
    return x


@pytest.fixture(autouse=True)
def no_job_config(monkeypatch):
    """Builders used from Python, not inside a job: no run config left in LAVIS's registry by an earlier test."""
    monkeypatch.delitem(registry.mapping["state"], "configuration", raising=False)


@pytest.fixture
def cache_root(tmp_path):
    """LAVIS's cache_root pointed at a fresh folder (relative storage paths resolve there), then restored."""
    root = tmp_path / "cache"
    root.mkdir()
    previous = set_cache_root(root)
    yield root
    set_cache_root(previous)


def merged(name, entry):
    """``datasets.<name>`` as LAVIS's Config merges it: the builder's default yaml, then the project's entry."""
    return Config.build_dataset_config({"datasets": {name: entry}}).datasets[name]


def build(name, entry):
    """The datasets LAVIS's builder ``name`` builds from the merged config (download step included)."""
    return registry.get_builder_class(name)(merged(name, entry)).build_datasets()


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def files_entry(*paths, url=None):
    train = {"storage": list(paths)}
    if url is not None:
        train["url"] = url
    return {"build_info": {"annotations": {"train": train}}}


@pytest.mark.parametrize("fmt", ["json", "strings", "txt"])
def test_each_file_format_is_read_by_lavis_builder_as_processed_text_input(tmp_path, fmt):
    entry = write_sentences(tmp_path, n=N_SENTENCES, fmt=fmt)
    path = entry["laion_sentence_115m"]["build_info"]["annotations"]["train"]["storage"]
    with open(path, encoding="utf-8") as f:
        head = f.read(2)
    assert {"json": '[{', "strings": '["', "txt": synthetic_sentences(1)[0][:2]}[fmt] == head
    datasets = build("laion_sentence_115m", entry["laion_sentence_115m"])
    (split, dataset), = datasets.items()
    assert split == "train" and isinstance(dataset, SentenceDataset) and len(dataset) == N_SENTENCES
    items = [dataset[i] for i in range(len(dataset))]
    assert all(set(item) == {"text_input"} for item in items)
    assert [item["text_input"] for item in items] == [CAPTION(s) for s in synthetic_sentences(N_SENTENCES)]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=dataset.collater)))
    assert batch == {"text_input": [item["text_input"] for item in items[:4]]}


def test_the_caption_processor_is_applied_and_txt_blank_lines_are_skipped(tmp_path):
    path = write(tmp_path / "mine.txt", "  A Red CIRCLE, on the LEFT!  \n\n   \r\nTwo   shapes: (a square)\n")
    dataset = build("sentences", files_entry(path))["train"]
    assert [dataset[i] for i in range(len(dataset))] == [{"text_input": "a red circle, on the left"},
                                                          {"text_input": "two shapes a square"}]


def test_json_objects_keep_only_their_caption_and_files_are_concatenated(tmp_path):
    laion = write(tmp_path / "laion.json", json.dumps([{"url": "http://x/1.jpg", "caption": "A dog."},
                                                       {"url": "http://x/2.jpg", "caption": "Two cats"}]))
    mine = write(tmp_path / "mine.json", json.dumps(["a bird"]))
    dataset = build("laion_sentence_115m", files_entry(laion, mine))["train"]
    assert [dataset[i]["text_input"] for i in range(3)] == ["a dog", "two cats", "a bird"]


def test_the_reference_yaml_builds_without_vis_processor_or_images_folder(tmp_path):
    """The reference's dataset entry (data_type images, an images folder that does not exist, a text processor for
    train only): no visual processor is built, no image folder is needed, the plugin's data check passes it by."""
    path = write(tmp_path / "laion115m" / "annotations" / "data.txt", "a photo of a cat\n")
    entry = {"data_type": "images",
             "build_info": {"annotations": {"train": {"url": [path], "storage": [path]}},
                            "images": {"storage": str(tmp_path / "laion115m" / "images")}},
             "text_processor": {"train": {"name": "blip_caption"}}}
    cfg = merged("laion_sentence_115m", entry)
    assert "vis_processor" not in cfg and not os.path.exists(tmp_path / "laion115m" / "images")
    builder = registry.get_builder_class("laion_sentence_115m")(cfg)
    check_builder(builder, OmegaConf.create({}), str(tmp_path / "job"), [])  # a .txt would fail a JSON entry check
    dataset = builder.build_datasets()["train"]
    assert dataset[0] == {"text_input": "a photo of a cat"}
    assert not os.path.exists(tmp_path / "job")


def test_relative_storage_is_under_cache_root_and_a_missing_file_is_copied_from_a_local_url(tmp_path, cache_root):
    source = write(tmp_path / "downloads" / "sentences.json", json.dumps([{"caption": "one"}, {"caption": "two"}]))
    entry = files_entry("laion115m/annotations/data.json", url=[source])
    assert check_dataset_paths({"laion_sentence_115m": merged("laion_sentence_115m", entry)}) is None
    dataset = build("laion_sentence_115m", entry)["train"]
    assert len(dataset) == 2 and os.path.isfile(cache_root / "laion115m" / "annotations" / "data.json")
    # a url relative to cache_root works too (the reference's url was a relative path)
    write(cache_root / "local" / "more.txt", "three\n")
    dataset = build("sentences", files_entry("sentences/train.txt", url=["local/more.txt"]))["train"]
    assert dataset[0] == {"text_input": "three"}


def test_the_default_configs_merge_into_the_project_entry(cache_root):
    laion = merged("laion_sentence_115m", {})
    assert laion.data_type == "text" and laion.text_processor.train.name == "blip_caption"
    train = laion.build_info.annotations.train
    assert train.storage == "laion115m/annotations/data.json" and train.url.startswith("https://")
    assert registry.get_builder_class("laion_sentence_115m").check_paths("laion_sentence_115m", laion) == [
        str(cache_root / "laion115m" / "annotations" / "data.json")]  # missing, but its url can fetch it
    with pytest.raises(SettingError, match="^datasets.sentences.build_info.annotations.train.storage: .*"
                                           "sentences/train.txt does not exist$"):
        check_dataset_paths({"sentences": merged("sentences", {})})
    with pytest.raises(SettingError, match="^datasets.sentence_shards.build_info.storage: names no shard"):
        check_dataset_paths({"sentence_shards": merged("sentence_shards", {})})


def shard_entry(tmp_path, n=N_SENTENCES, shard_size=SHARD_SIZE):
    entry = write_sentence_shards(tmp_path, n=n, shard_size=shard_size)
    return entry["sentence_shards"], shard_urls(entry["sentence_shards"]["build_info"]["storage"])


def test_sentence_shards_hold_txt_samples_and_stream_through_lavis_builder(tmp_path):
    entry, urls = shard_entry(tmp_path)
    assert [os.path.basename(u) for u in urls] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    with tarfile.open(urls[0]) as tar:
        assert tar.getnames() == [f"00000000{i}.txt" for i in range(SHARD_SIZE)]
    (split, dataset), = build("sentence_shards", entry).items()
    assert split == "train" and isinstance(dataset, SentenceShards) and not hasattr(dataset, "__len__")
    stream = iter(dataset)
    samples = [next(stream) for _ in range(3 * N_SENTENCES)]  # endless: three passes
    assert all(set(s) == {"text_input", "__key__"} for s in samples)
    expected = {key: CAPTION(sentence) for _, key, _, sentence in scene_samples(N_SENTENCES, SHARD_SIZE)}
    assert all(s["text_input"] == expected[s["__key__"]] for s in samples)
    assert {s["__key__"] for s in samples} == set(expected)
    assert [s["__key__"] for s in samples[:N_SENTENCES]] != list(expected)  # shards and samples shuffled
    with pytest.raises(SettingError, match="^datasets.sentence_shards is streamed"):
        check_streamed_datasets("runner_base", {"sentence_shards": entry})
    check_streamed_datasets("runner_iter", {"sentence_shards": entry})


def test_image_text_shards_are_read_for_their_captions_alone(tmp_path):
    from lavis_accel.datasets import write_scene_shards

    entry = write_scene_shards(tmp_path, n=4, shard_size=2, txt=False)  # captions in the .json only
    urls = shard_urls(entry["image_text_shards"]["build_info"]["storage"])
    samples = list(SentenceShards(urls, identity, passes=1, shuffle=False))
    assert [s["text_input"] for s in samples] == [c for *_, c in scene_samples(4, 2)]


def keys_of(urls, shards):
    return [key for url in shards for shard, key, _, _ in scene_samples(N_SENTENCES, SHARD_SIZE) if urls[shard] == url]


@pytest.mark.parametrize("world_size, num_workers", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_ranks_and_workers_read_disjoint_shares_that_cover_every_sentence(tmp_path, monkeypatch, world_size,
                                                                          num_workers):
    _, urls = shard_entry(tmp_path)
    seen = []
    for rank, worker in itertools.product(range(world_size), range(num_workers)):
        for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("WORKER", worker),
                            ("NUM_WORKERS", num_workers)):
            monkeypatch.setenv(name, str(value))  # how webdataset learns ranks and workers, as torchrun sets them
        keys = [s["__key__"] for s in SentenceShards(urls, identity, passes=1, seed=7, shuffle_buffer=4)]
        assert sorted(keys) == sorted(keys_of(urls, shard_share(urls, rank, world_size, worker, num_workers,
                                                                seed=7, epoch=0)))
        seen += keys
    assert sorted(seen) == sorted(key for _, key, _, _ in scene_samples(N_SENTENCES, SHARD_SIZE))


def test_dataloader_workers_split_a_ranks_share(tmp_path, monkeypatch):
    _, urls = shard_entry(tmp_path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stream = SentenceShards(urls, identity, passes=1, seed=3)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2,
                                         collate_fn=lambda sample: sample["__key__"])
    share = shard_share(urls, 1, 2, 0, 1, seed=3, epoch=0)
    assert len(share) == 2 and sorted(loader) == sorted(keys_of(urls, share))


def test_too_few_shards_for_the_ranks_is_refused_by_the_builder(tmp_path, monkeypatch):
    entry, _ = shard_entry(tmp_path, n=4, shard_size=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SettingError, match=r"^datasets.sentence_shards.build_info.storage: 2 shard\(s\) for 4 "
                                           r"rank\(s\) x 1 data loader worker\(s\)"):
        SentenceShardsBuilder(merged("sentence_shards", entry)).build_datasets()


# ---- bad input: one line naming the setting or the file, before any work ----

def refused(name, entry, match):
    """Refused by the pre-job path check (when it can see it) or else by LAVIS's builder."""
    with pytest.raises(SettingError, match=match) as error:
        check_dataset_paths({name: merged(name, entry)})
        build(name, entry)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"datasets.{name}")
    return message


def test_a_missing_sentence_file_is_refused(tmp_path):
    missing = str(tmp_path / "nowhere.json")
    refused("laion_sentence_115m", files_entry(missing),
            f"^datasets.laion_sentence_115m.build_info.annotations.train.storage: {missing} does not exist")
    refused("laion_sentence_115m", files_entry(missing, url=["not/a/file.json"]),
            "^datasets.laion_sentence_115m.build_info.annotations.train.url: not/a/file.json is neither a local "
            "file nor a url")
    folder = tmp_path / "folder"
    folder.mkdir()
    refused("sentences", files_entry(str(folder)), f"^datasets.sentences.build_info.annotations.train.storage: "
                                                   f"{folder} is a folder")


@pytest.mark.parametrize("file_name, text", [
    ("empty.txt", ""), ("blank.txt", "\n  \n\t\n"), ("empty.json", "[]"),
])
def test_an_empty_sentence_file_is_refused(tmp_path, file_name, text):
    path = write(tmp_path / file_name, text)
    refused("sentences", files_entry(path),
            f"^datasets.sentences.build_info.annotations.train.storage: {path} holds no sentence$")


@pytest.mark.parametrize("content, problem", [
    ('{"caption": "a dog"}', "holds a JSON dict: a sentence file holds a JSON list of"),
    ("[1, 2]", "entry 0 is a int, not a string or an object with a 'caption' string"),
    ('[{"text": "a dog"}]', "entry 0 is an object with no 'caption', not a 'caption' string"),
    ('["a dog", {"caption": 3}]', "entry 1 is an object with a int 'caption', not a 'caption' string"),
    ('["a dog", " "]', "entry 1 is a blank sentence"),
    ("a dog\na cat\n", "is not valid JSON \\(line 1, column 1"),
])
def test_a_json_in_neither_format_is_refused(tmp_path, content, problem):
    path = write(tmp_path / "sentences.json", content)
    refused("laion_sentence_115m", files_entry(path),
            f"^datasets.laion_sentence_115m.build_info.annotations.train.storage: {path} {problem}")


def test_bad_entries_are_left_out_with_on_bad_sample_skip_unless_all_are_bad(tmp_path):
    path = write(tmp_path / "sentences.json", json.dumps(["a dog", 7, {"caption": "a cat"}, {"caption": ""}]))
    where = "datasets.sentences.build_info.annotations.train.storage"
    assert SentenceDataset.from_files([path], identity, where, "skip").annotation == ["a dog", "a cat"]
    all_bad = write(tmp_path / "bad.json", json.dumps([7, {"text": "x"}]))
    with pytest.raises(SettingError, match=f"^{where}: {all_bad} holds no sentence: every entry is bad, e.g. entry 0"):
        SentenceDataset.from_files([all_bad], identity, where, "skip")


@pytest.mark.parametrize("annotations, message", [
    ({"train": {"storage": []}}, ".train.storage: names no sentence file"),
    ({"train": {"storage": ["a.txt", "b.txt"], "url": ["a.txt"]}}, ".train: 1 url\\(s\\) for 2 storage file\\(s\\)"),
    ({"train": {"storage": "a.txt"}, "val": {"storage": "b.txt"}}, ": sentences has a train split only"),
])
def test_malformed_annotation_settings_are_refused(annotations, message):
    with pytest.raises(SettingError, match=f"^datasets.sentences.build_info.annotations{message}"):
        registry.get_builder_class("sentences").check_paths("sentences", OmegaConf.create(
            {"build_info": {"annotations": annotations}}))


@pytest.mark.parametrize("storage, message", [
    (None, "names no shard"),
    ("", "'' is not a shard path or pattern"),
    ([], "names no shard"),
])
def test_an_empty_shard_pattern_is_refused(storage, message):
    entry = {"build_info": {"storage": storage}}
    with pytest.raises(SettingError, match=f"^datasets.sentence_shards.build_info.storage: {message}"):
        check_dataset_paths({"sentence_shards": merged("sentence_shards", entry)})
    with pytest.raises(SettingError, match=f"^datasets.sentence_shards.build_info.storage: {message}"):
        build("sentence_shards", entry)


def test_missing_or_empty_shards_are_refused_before_any_sample(tmp_path):
    entry, urls = shard_entry(tmp_path)
    missing = entry["build_info"]["storage"].replace("{00000..00003}", "{00000..00004}")
    refused("sentence_shards", {"build_info": {"storage": missing}},
            f"^datasets.sentence_shards.build_info.storage: shard {os.path.dirname(urls[0])}/00004.tar does not exist")
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(SettingError, match=f"^datasets.sentence_shards.build_info.storage: shard {empty} holds no "
                                           "sample"):
        build("sentence_shards", {"build_info": {"storage": str(empty)}})


def test_a_shard_sample_without_a_sentence_stops_with_one_line_or_is_skipped(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for key, name, data in (("a", "a.txt", b"a dog"), ("b", "b.jpg", b"\xff\xd8"), ("c", "c.txt", b" "),
                                ("d", "d.txt", b"a cat")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SettingError, match=f"^datasets.sentence_shards: sample b of shard {path} has no sentence"):
        list(SentenceShards([str(path)], identity, passes=1, shuffle=False))
    skipped = SentenceShards([str(path)], identity, passes=1, shuffle=False, on_bad_sample="skip")
    assert [s["text_input"] for s in skipped] == ["a dog", "a cat"]


def test_the_writers_refuse_bad_sizes(tmp_path):
    for call in (lambda: write_sentences(tmp_path, n=0), lambda: write_sentences(tmp_path, fmt="csv"),
                 lambda: write_sentence_shards(tmp_path, n=3, shard_size=0)):
        with pytest.raises(ValueError):
            call()


@pytest.fixture
def http_folder(tmp_path):
    """A folder served over http on the loopback interface, for LAVIS's downloader (no outside network)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_missing_file_with_a_remote_url_is_downloaded_once_or_refused_in_one_line(tmp_path, http_folder):
    folder, address = http_folder
    write(folder / "laion.json", json.dumps([{"url": "http://x/1.jpg", "caption": "A Horse"}]))
    storage = tmp_path / "cache" / "laion115m" / "data.json"
    entry = files_entry(str(storage), url=[f"{address}/laion.json"])
    assert build("laion_sentence_115m", entry)["train"][0] == {"text_input": "a horse"}
    (folder / "laion.json").unlink()  # the stored file is used from now on
    assert build("laion_sentence_115m", entry)["train"][0] == {"text_input": "a horse"}
    gone = files_entry(str(tmp_path / "other.json"), url=[f"{address}/gone.json"])
    message = refused("laion_sentence_115m", gone, f"^datasets.laion_sentence_115m.build_info.annotations.train.url: "
                                                   f"{address}/gone.json could not be fetched to {tmp_path}/other.json")
    assert "404" in message and not os.path.exists(tmp_path / "other.json")
