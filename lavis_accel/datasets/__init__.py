"""Data for LAVIS that LAVIS lacks: synthetic scenes written in LAVIS's own annotation formats (and as img2dataset
tar shards), and the dataset builders ``image_text_shards``, ``flickr30k_caption`` and the sentence builders
``laion_sentence_115m``, ``sentences``, ``sentence_shards`` (P-Former's stage 0), registered on import."""
from lavis_accel.datasets.language import CAPTION_PROMPT, PLACES, answer_list, captions, corpus, questions, statements
from lavis_accel.datasets.scenes import COLORS, KINDS, POSITIONS, Scene, Shape, generate_scenes, render
from lavis_accel.datasets.synthetic import (
    set_cache_root,
    write_all,
    write_caption,
    write_flickr30k_caption,
    write_nlvr,
    write_retrieval,
    write_vqa,
)
from lavis_accel.datasets.pairs import PAIR_DATASETS, write_image_text_pairs
from lavis_accel.datasets.shards import ImageTextShards, scene_samples, shard_share, shard_urls, write_scene_shards
from lavis_accel.datasets import builders  # noqa: E402,F401  (registers image_text_shards, flickr30k_caption)
from lavis_accel.datasets.sentences import (  # noqa: E402
    SentenceDataset, SentenceShards, synthetic_sentences, write_sentence_shards, write_sentences,
)
from lavis_accel.datasets import sentence_builders  # noqa: E402,F401  (laion_sentence_115m, sentences, sentence_shards)

__all__ = [
    "CAPTION_PROMPT", "COLORS", "ImageTextShards", "KINDS", "PAIR_DATASETS", "PLACES", "POSITIONS", "Scene", "Shape",
    "answer_list", "captions", "corpus", "generate_scenes", "questions", "render", "scene_samples", "set_cache_root",
    "shard_share", "shard_urls", "statements", "write_all", "write_caption", "write_flickr30k_caption",
    "write_image_text_pairs", "write_nlvr", "write_retrieval", "write_scene_shards", "write_vqa",
    "SentenceDataset", "SentenceShards", "synthetic_sentences", "write_sentence_shards", "write_sentences",
]
