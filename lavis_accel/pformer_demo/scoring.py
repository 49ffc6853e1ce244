"""Scoring a trained BLIP-2 on the held-out images: the frozen OPT's caption loss given the queries, and what its
generated captions get right.

Both come from stock LAVIS ``blip2_opt`` loading a run's stage-2 checkpoint, in eval mode:

- **caption loss**: ``blip2_opt.forward`` on each held-out image with each of its five captions (BLIP's caption
  cleaning, the model's ``max_txt_len`` truncation): OPT's cross-entropy in nats per caption token, averaged over
  all held-out tokens, and its exponential, the perplexity. Per image too, so two runs can be compared image by
  image. The same captions read after *another* held-out image's queries give ``mismatched_loss``; its excess
  over the caption loss, ``image_gain``, is what the queries pass on about their own image (0: nothing).
- **generated captions**: ``blip2_opt.generate`` (greedy), parsed into (colour, shape, position) objects with the
  phrasings the data uses; compared with the scene's objects: precision and recall of the (colour, shape) pairs
  named, and the share of images whose caption names exactly the scene's objects with their positions.

``text_only_loss`` is the frozen OPT alone on the same captions (no queries), for reference.
"""
import math
import re

import torch

from lavis_accel.datasets import COLORS, KINDS, PLACES

PLACE_OF = {phrase: position for position, phrase in PLACES.items()}
_COLOR = "|".join(COLORS)
_KIND = "|".join(KINDS)
_PLACE = "|".join(sorted(map(re.escape, PLACE_OF), key=len, reverse=True))
_THING_THEN_PLACE = re.compile(rf"\b(?:a|an) ({_COLOR}) ({_KIND}) ({_PLACE})\b")
_PLACE_THEN_THING = re.compile(rf"\b({_PLACE}) (?:a|an) ({_COLOR}) ({_KIND})\b")
_THING = re.compile(rf"\b({_COLOR}) ({_KIND})\b")
GENERATION_BATCH = 16


def objects_named(caption):
    """``(things, objects)`` a caption names: the set of (colour, shape) pairs, and of (colour, shape, position)
    triples written in either of the data's orders ("a red circle on the left", "on the left a red circle")."""
    caption = caption.lower()
    things = {match.groups() for match in _THING.finditer(caption)}
    objects = {(color, kind, PLACE_OF[place]) for color, kind, place in _THING_THEN_PLACE.findall(caption)}
    objects |= {(color, kind, PLACE_OF[place]) for place, color, kind in _PLACE_THEN_THING.findall(caption)}
    return things, objects


def caption_scores(generated, truths):
    """Scores of generated captions against the scenes' objects (lists of (colour, shape, position)):
    ``thing_precision`` / ``thing_recall`` / ``thing_f1`` of the (colour, shape) pairs over all images, and
    ``exact_scene``: the share of captions naming exactly the scene's objects and positions (percentages)."""
    hits = named = present = exact = 0
    for caption, truth in zip(generated, truths):
        things, objects = objects_named(caption)
        true_things = {(color, kind) for color, kind, _ in truth}
        hits += len(things & true_things)
        named += len(things)
        present += len(true_things)
        exact += objects == set(map(tuple, truth))
    precision = hits / named if named else 0.0
    recall = hits / present if present else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"thing_precision": 100 * precision, "thing_recall": 100 * recall, "thing_f1": 100 * f1,
            "exact_scene": 100 * exact / max(1, len(truths))}


def build_stock_model(model_cfg):
    """Stock LAVIS ``blip2_opt`` from ``model_cfg`` (its checkpoint loaded by ``from_config``), float32, eval."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(model_cfg)
    return registry.get_model_class(cfg.arch).from_config(cfg).float().eval()


def processors(image_size):
    """LAVIS's eval image processor at ``image_size`` and BLIP's caption cleaning, as the training data used."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    image = registry.get_processor_class("blip_image_eval").from_config(OmegaConf.create({"image_size": image_size}))
    return image, registry.get_processor_class("blip_caption")()


def caption_token_count(model, texts):
    """The caption tokens ``blip2_opt.forward`` scores for ``texts`` (after ``</s>``, with "\\n", truncated)."""
    tokens = model.opt_tokenizer([t + "\n" for t in texts], padding="longest", truncation=True,
                                 max_length=model.max_txt_len, return_tensors="pt")
    return int(tokens.attention_mask.sum())


def _caption_loss(model, image, texts):
    """``blip2_opt.forward``'s loss on ``texts``, each read after the queries of ``image``."""
    samples = {"image": image.unsqueeze(0).expand(len(texts), -1, -1, -1), "text_input": texts}
    return model(samples)["loss"].item()


@torch.no_grad()
def score(model, held_out, image_size, max_caption_tokens):
    """Score ``model`` on ``held_out`` (``data.read_held_out``): the metrics, the per-image caption losses and the
    generated captions."""
    from PIL import Image

    image_processor, text_processor = processors(image_size)
    images = [image_processor(Image.open(path).convert("RGB")) for path, _, _ in held_out]
    losses, mismatched, tokens = [], [], []
    for index, (_, texts, _) in enumerate(held_out):
        texts = [text_processor(text) for text in texts]
        losses.append(_caption_loss(model, images[index], texts))
        mismatched.append(_caption_loss(model, images[(index + 1) % len(images)], texts))
        tokens.append(caption_token_count(model, texts))
    generated = []
    for start in range(0, len(images), GENERATION_BATCH):
        batch = torch.stack(images[start:start + GENERATION_BATCH])
        generated += model.generate({"image": batch}, num_beams=1, max_length=max_caption_tokens, min_length=1)
    loss = sum(l * n for l, n in zip(losses, tokens)) / sum(tokens)
    other = sum(l * n for l, n in zip(mismatched, tokens)) / sum(tokens)
    metrics = {"caption_loss": loss, "perplexity": math.exp(loss), "mismatched_loss": other,
               "image_gain": other - loss,
               **caption_scores(generated, [objects for _, _, objects in held_out])}
    return metrics, losses, generated


@torch.no_grad()
def text_only_loss(model, held_out):
    """The frozen OPT's loss on the held-out captions with no image and no queries (``</s> caption \\n``, scored
    after ``</s>``, truncated as ``blip2_opt.forward`` truncates)."""
    _, text_processor = processors(1)
    total = count = 0
    for _, texts, _ in held_out:
        tokens = model.opt_tokenizer([text_processor(t) + "\n" for t in texts], padding="longest", truncation=True,
                                     max_length=model.max_txt_len, return_tensors="pt")
        labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
        scored = int((labels[:, 1:] != -100).sum())
        loss = model.opt_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, labels=labels).loss
        total += loss.item() * scored
        count += scored
    return total / count


def paired_difference(losses_a, losses_b):
    """Mean and standard error over images of ``b - a`` (per-image caption losses of two runs on the same images):
    how much of a difference the held-out sample alone could make (not the spread over training seeds)."""
    differences = [b - a for a, b in zip(losses_a, losses_b)]
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    return mean, math.sqrt(variance / n)
