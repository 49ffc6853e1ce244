"""The text written about scenes: captions, VQA questions with answers, NLVR2 statements with truth values.

Everything is generated from the scene's signature, so it is true of the picture by construction. NLVR2 statements
use "left" and "right" only for the two images of a pair, never for a position inside an image: LAVIS's NLVR2
training set swaps the two images and those two words together at random, which keeps only such statements true.
"""
import random
from collections import namedtuple

from lavis_accel.datasets.scenes import COLORS, KINDS, MAX_SHAPES, POSITIONS, Scene, Shape, generate_scenes

CAPTION_PROMPT = "a picture of "  # the prompt of LAVIS's BLIP captioning configs, prepended by the text processor
PLACES = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")

Question = namedtuple("Question", "text answer question_type answer_type")


def _a(word):
    return "an" if word[0] in "aeiou" else "a"


def _thing(color, kind):
    return f"{_a(color)} {color} {kind}"


def _listing(parts):
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene):
    """Five phrasings of the scene, e.g. "a red circle on the left and a blue square at the top"."""
    described = [f"{_thing(s.color, s.kind)} {PLACES[s.position]}" for s in scene.shapes]
    placed_first = [f"{PLACES[s.position]} {_thing(s.color, s.kind)}" for s in scene.shapes]
    count = len(scene.shapes)
    return [
        _listing(described),
        f"an image showing {_listing(described)}",
        _listing(described[::-1]),
        f"{NUMBERS[count]} shape{'s' if count > 1 else ''}: {_listing(described)}",
        _listing(placed_first),
    ]


def questions(scene, rng):
    """Every question asked about the scene (colour, shape, position, count, yes/no), each with its one answer.

    ``rng`` picks the absent object and the wrong position that the "no" questions name.
    """
    found = [Question("how many shapes are there?", str(len(scene.shapes)), "how many", "number")]
    used_colors = {s.color for s in scene.shapes}
    for s in scene.shapes:
        if rng.random() < 0.5:
            absent = _thing(rng.choice([c for c in COLORS if c not in used_colors]), s.kind)
        else:
            absent = _thing(s.color, rng.choice([k for k in KINDS if k != s.kind]))
        elsewhere = rng.choice([p for p in POSITIONS if p != s.position])
        thing = _thing(s.color, s.kind)
        found += [
            Question(f"what color is the {s.kind}?", s.color, "what color is the", "other"),
            Question(f"what shape is {PLACES[s.position]}?", s.kind, "what shape is", "other"),
            Question(f"where is the {s.color} {s.kind}?", s.position, "where is the", "other"),
            Question(f"is there {thing}?", "yes", "is there a", "yes/no"),
            Question(f"is there {absent}?", "no", "is there a", "yes/no"),
            Question(f"is the {s.color} {s.kind} {PLACES[s.position]}?", "yes", "is the", "yes/no"),
            Question(f"is the {s.color} {s.kind} {PLACES[elsewhere]}?", "no", "is the", "yes/no"),
        ]
    return found


def answer_list():
    """Every answer a question can have, in LAVIS's ``answer_list.json`` form (a list of strings)."""
    counts = [str(n) for n in range(1, MAX_SHAPES + 1)]
    return list(COLORS) + list(KINDS) + list(POSITIONS) + counts + ["yes", "no"]


def statements(left, right):
    """Every statement made about a pair of scenes shown left and right, as families of (text, is_true).

    A family is one template over all its fillers; drawing a family first keeps templates equally frequent.
    """
    things = {side: {(s.color, s.kind) for s in scene.shapes} for side, scene in (("left", left), ("right", right))}
    kinds = {side: {kind for _, kind in pairs} for side, pairs in things.items()}
    colors = {side: {color for color, _ in pairs} for side, pairs in things.items()}
    counts = {"left": len(left.shapes), "right": len(right.shapes)}
    families = [
        [(f"the {side} image contains {_thing(color, kind)}", (color, kind) in things[side])
         for color in COLORS for kind in KINDS]
        for side in ("left", "right")
    ]
    families += [
        [(f"both images contain {_a(kind)} {kind}", kind in kinds["left"] and kind in kinds["right"])
         for kind in KINDS],
        [(f"both images contain {_a(color)} {color} shape", color in colors["left"] and color in colors["right"])
         for color in COLORS],
        [(f"exactly one image contains {_a(kind)} {kind}", (kind in kinds["left"]) != (kind in kinds["right"]))
         for kind in KINDS],
        [(f"the {more} image has more shapes than the {fewer} image", counts[more] > counts[fewer])
         for more, fewer in (("left", "right"), ("right", "left"))],
        [(f"there are {NUMBERS[total]} shapes in total", counts["left"] + counts["right"] == total)
         for total in range(2, 2 * MAX_SHAPES + 1)],
    ]
    return families


def pick_statement(left, right, rng):
    """One statement about the pair and its truth; true or false with equal chance."""
    want = rng.random() < 0.5
    families = [[text for text, truth in family if truth == want] for family in statements(left, right)]
    return rng.choice(rng.choice([family for family in families if family])), want


def corpus():
    """Sentences that together use every word the generator writes, for training small local tokenizers.

    Covers the caption prompt, every caption phrasing of every (color, kind, position), every question template,
    every answer and every statement template, each word at least once; deterministic.
    """
    rng = random.Random(0)
    sentences = [CAPTION_PROMPT.strip()] + answer_list()
    for color in COLORS:
        for kind in KINDS:
            for position in POSITIONS:
                scene = Scene((Shape(color, kind, position, 0.0, 0.0, 0.7),), background=50)
                sentences += captions(scene) + [q.text for q in questions(scene, rng)]
    crowded = generate_scenes(2 * MAX_SHAPES, seed=0)
    for scene in crowded:
        sentences += captions(scene)
    for family in statements(crowded[0], crowded[1]):
        sentences += [text for text, _ in family]
    return list(dict.fromkeys(sentences))
