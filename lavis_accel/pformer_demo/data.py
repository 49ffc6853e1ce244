"""The P-Former demo's data: few image-text pairs, held-out images, and many sentences without images.

All three come from the synthetic scenes (``lavis_accel.datasets``), so the text-only sentences speak the language
of the pairs' captions, as LAION's captions do of COCO's. The pairs and the held-out images are the first
``pairs`` and the next ``held_out`` scenes of one seeded draw (every scene is different); the sentences come from
another draw, with every caption of a held-out scene left out, so neither the toy LLM nor the P-Former has read
the held-out captions.
"""
import json
import os

from lavis_accel.datasets import captions, generate_scenes, render, write_image_text_pairs, write_sentences
from lavis_accel.datasets.sentences import NAME as SENTENCE_DATASET

PAIR_DATASET = "conceptual_caption_3m"  # one caption per image, as CC3M's pairs
HELD_OUT_FILE = "held_out.json"
SENTENCE_SEED_OFFSET = 1  # the sentences' scenes are another draw than the pairs'


def held_out_scenes(settings):
    """The scenes after the training pairs' in the same draw: never trained on, as images or as text."""
    return generate_scenes(settings.pairs + settings.held_out, settings.seed)[settings.pairs:]


def write_held_out(settings, directory):
    """Render the held-out images under ``directory`` and write ``held_out.json``: per image its file, its five
    captions and its objects; return the path of the json."""
    os.makedirs(directory, exist_ok=True)
    entries = []
    for index, scene in enumerate(held_out_scenes(settings)):
        name = f"held_out_{index:05d}.png"
        render(scene, settings.image_size).save(os.path.join(directory, name))
        entries.append({"image": name, "captions": captions(scene),
                        "objects": [[s.color, s.kind, s.position] for s in scene.shapes]})
    path = os.path.join(directory, HELD_OUT_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(entries, handle, indent=1)
    return path


def read_held_out(path):
    """``[(image path, captions, objects)]`` of a held-out json."""
    with open(path, encoding="utf-8") as handle:
        entries = json.load(handle)
    directory = os.path.dirname(path)
    return [(os.path.join(directory, e["image"]), e["captions"], [tuple(o) for o in e["objects"]]) for e in entries]


def write_pairs(settings, root):
    """The ``datasets:`` entry of the training pairs (``conceptual_caption_3m``: one caption per image)."""
    return write_image_text_pairs(root, PAIR_DATASET, n=settings.pairs, image_size=settings.image_size,
                                  seed=settings.seed)


def sentence_file(entry):
    return entry[SENTENCE_DATASET]["build_info"]["annotations"]["train"]["storage"]


def write_language(settings, root, held_out_path):
    """Write the text-only sentences (``laion_sentence_115m``'s format: one phrasing per scene) without any
    held-out caption; return ``(datasets: entry, scenes)``, ``scenes`` being every phrasing of each of those
    scenes (the toy LLM's documents)."""
    entry = write_sentences(root, settings.sentences, seed=settings.seed + SENTENCE_SEED_OFFSET)
    unseen = {caption for _, texts, _ in read_held_out(held_out_path) for caption in texts}
    path = sentence_file(entry)
    with open(path, encoding="utf-8") as handle:
        kept = [item for item in json.load(handle) if item["caption"] not in unseen]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(kept, handle)
    scenes = [captions(scene) for scene in generate_scenes(settings.sentences, settings.seed + SENTENCE_SEED_OFFSET)]
    return entry, [phrasings for phrasings in scenes if not unseen.intersection(phrasings)]
