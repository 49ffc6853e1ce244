"""Data for LAVIS that LAVIS lacks: synthetic scenes written in LAVIS's own annotation formats."""
from lavis_accel.datasets.language import CAPTION_PROMPT, PLACES, answer_list, captions, corpus, questions, statements
from lavis_accel.datasets.scenes import COLORS, KINDS, POSITIONS, Scene, Shape, generate_scenes, render
from lavis_accel.datasets.synthetic import (
    set_cache_root,
    write_all,
    write_caption,
    write_nlvr,
    write_retrieval,
    write_vqa,
)

__all__ = [
    "CAPTION_PROMPT", "COLORS", "KINDS", "PLACES", "POSITIONS", "Scene", "Shape", "answer_list", "captions", "corpus",
    "generate_scenes", "questions", "render", "set_cache_root", "statements", "write_all", "write_caption",
    "write_nlvr", "write_retrieval", "write_vqa",
]
