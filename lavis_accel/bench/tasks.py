"""One inference step per LAVIS task, built from the model's own methods and modules, on synthetic inputs.

The run settings are those of LAVIS's BLIP evaluation yamls (``lavis/projects/blip/eval/*.yaml``): retrieval
``k_test`` 256, caption beams 3 / max 20 / min 5, VQA ``rank`` over 128 answer candidates. Texts are made of whole
words from the model's own vocabulary, so each word is one token whatever tokenizer is installed.
"""
import random
from dataclasses import dataclass
from typing import Callable, List

import torch
import torch.nn.functional as F
from lavis.models.blip_models.blip_caption import BlipCaption
from lavis.models.blip_models.blip_nlvr import BlipNLVR
from lavis.models.blip_models.blip_retrieval import BlipRetrieval
from lavis.models.blip_models.blip_vqa import BlipVQA
from lavis.models.clip_models.model import CLIP

from lavis_accel.errors import SettingError

RETRIEVAL_TEXT_LENGTH = 35  # compute_sim_matrix pads every caption to 35 tokens
CAPTION_BEAMS, CAPTION_MAX_LENGTH, CAPTION_MIN_LENGTH = 3, 20, 5
VQA_ANSWER_LIST_SIZE = 3128  # answers in LAVIS's VQAv2 answer_list.json
QUESTION_WORDS = 8
STATEMENT_WORDS = 15


@dataclass
class Step:
    """A timed unit of work: ``run()`` processes ``samples`` samples, each holding ``images_per_sample`` images."""

    description: str
    run: Callable[[], object]
    samples: int
    images_per_sample: int = 1


@dataclass
class StepInputs:
    """What every task step is built from."""

    batch_size: int
    image_size: int
    device: torch.device
    candidates: int = 1  # retrieval: ITM re-ranked texts per image; VQA: answer candidates
    seed: int = 0
    dtype: torch.dtype = torch.float32  # of the images: the model's own dtype


def random_images(inputs: StepInputs, generator) -> torch.Tensor:
    """``inputs.batch_size`` random images on the inputs' device, in their dtype."""
    shape = (inputs.batch_size, 3, inputs.image_size, inputs.image_size)
    return torch.randn(*shape, generator=generator).to(inputs.device, inputs.dtype)


def vocabulary_sentences(tokenizer, count, words, seed) -> List[str]:
    """``count`` sentences of ``words`` whole-word vocabulary entries each (one token per word)."""
    vocabulary = sorted(token for token in tokenizer.vocab if token.isalpha() and token.islower())
    if not vocabulary:
        raise SettingError("the model's tokenizer has no whole-word lower-case tokens to build synthetic texts from")
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocabulary) for _ in range(words)) for _ in range(count)]


def vision_step(model, inputs: StepInputs) -> Step:
    """The vision encoder alone, as every BLIP task calls it (``visual_encoder.forward_features``), or CLIP's image
    tower (``encode_image``)."""
    generator = torch.Generator().manual_seed(inputs.seed)
    images = random_images(inputs, generator)
    if isinstance(model, CLIP):
        return Step("image tower", lambda: model.encode_image(images), inputs.batch_size)
    return Step("vision encoder", lambda: model.visual_encoder.forward_features(images), inputs.batch_size)


CLIP_WORDS = ("a", "photo", "of", "the", "red", "blue", "green", "small", "large", "dog", "cat", "car", "man",
              "woman", "tree", "house", "on", "in", "near", "street", "table", "with", "two", "white", "black")
CAPTIONS_PER_IMAGE = 5  # COCO / Flickr30k


def clip_captions(count: int, seed: int) -> List[str]:
    """``count`` captions of 5 to 15 common words (CLIP's tokenizer pads each to its 77-token context)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(CLIP_WORDS) for _ in range(rng.randint(5, 15))) for _ in range(count)]


def clip_retrieval_step(model: CLIP, inputs: StepInputs) -> Step:
    """CLIP retrieval per image, as LAVIS's ``compute_sim_matrix`` spends it: the image tower, the text tower on the
    image's share of the gallery (five captions per image) and the similarities."""
    generator = torch.Generator().manual_seed(inputs.seed)
    images = random_images(inputs, generator)
    texts = model.tokenizer(clip_captions(inputs.batch_size * CAPTIONS_PER_IMAGE, inputs.seed)).to(inputs.device)

    def run():
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(texts), dim=-1)
        return image_features @ text_features.t()

    return Step(f"clip retrieval: image + {CAPTIONS_PER_IMAGE} captions", run, inputs.batch_size)


def text_step(model, inputs: StepInputs) -> Step:
    """The text encoder alone on ``inputs.batch_size`` captions, as retrieval encodes its text gallery: CLIP's text
    tower (``encode_text``), or a BLIP model's unimodal text pass (``forward_text`` padded to 35 tokens, as
    ``compute_sim_matrix`` pads, then ``text_proj``). Models without a unimodal text pass have no text step."""
    if isinstance(model, CLIP):
        texts = model.tokenizer(clip_captions(inputs.batch_size, inputs.seed)).to(inputs.device)
        return Step("text tower", lambda: model.encode_text(texts), inputs.batch_size)
    if not (hasattr(model, "text_proj") and hasattr(getattr(model, "text_encoder", None), "forward_text")):
        raise SettingError(f"--parts text: {type(model).__name__} has no unimodal text pass to measure (CLIP and "
                           "BLIP retrieval have one)")
    captions = vocabulary_sentences(model.tokenizer, inputs.batch_size, RETRIEVAL_TEXT_LENGTH, inputs.seed)
    texts = model.tokenizer(
        captions, padding="max_length", truncation=True, max_length=RETRIEVAL_TEXT_LENGTH, return_tensors="pt"
    ).to(inputs.device)

    def run():
        text_features = model.text_encoder.forward_text(texts).last_hidden_state[:, 0, :]
        return F.normalize(model.text_proj(text_features), dim=-1)

    return Step("text encoder", run, inputs.batch_size)


def retrieval_step(model: BlipRetrieval, inputs: StepInputs) -> Step:
    """Image-to-text retrieval per query image, as ``compute_sim_matrix`` does it: ITC over the text gallery, then
    ITM re-ranking of the top ``candidates`` texts. The gallery's text features are precomputed, as there."""
    generator = torch.Generator().manual_seed(inputs.seed)
    images = random_images(inputs, generator)
    captions = vocabulary_sentences(model.tokenizer, inputs.candidates, RETRIEVAL_TEXT_LENGTH, inputs.seed)
    texts = model.tokenizer(
        captions, padding="max_length", truncation=True, max_length=RETRIEVAL_TEXT_LENGTH, return_tensors="pt"
    ).to(inputs.device)
    with torch.no_grad():
        text_features = model.text_encoder.forward_text(texts).last_hidden_state[:, 0, :]
        gallery = F.normalize(model.text_proj(text_features), dim=-1)
    text_ids = texts.input_ids.clone()
    text_ids[:, 0] = model.tokenizer.enc_token_id

    def run():
        image_tokens = model.visual_encoder.forward_features(images)
        image_embeds = F.normalize(model.vision_proj(image_tokens[:, 0, :]), dim=-1)
        similarity = image_embeds @ gallery.t()
        scores = []
        for tokens, sims in zip(image_tokens, similarity):
            top_sims, top_ids = sims.topk(k=inputs.candidates)
            repeated = tokens.expand(inputs.candidates, -1, -1)
            matched = model.text_encoder(
                text_ids[top_ids],
                attention_mask=texts.attention_mask[top_ids],
                encoder_hidden_states=repeated,
                encoder_attention_mask=torch.ones(repeated.shape[:-1], dtype=torch.long, device=repeated.device),
                return_dict=True,
            )
            scores.append(model.itm_head(matched.last_hidden_state[:, 0, :])[:, 1] + top_sims)
        return scores

    return Step(f"retrieval: ITC + ITM over k={inputs.candidates}", run, inputs.batch_size)


def caption_step(model: BlipCaption, inputs: StepInputs) -> Step:
    """``model.generate`` with the beam settings of LAVIS's caption evaluation (beam search, named: a model whose
    ``generate`` samples by default, as DLIP's student does, searches beams too)."""
    generator = torch.Generator().manual_seed(inputs.seed)
    samples = {"image": random_images(inputs, generator)}

    def run():
        return model.generate(
            samples, use_nucleus_sampling=False, num_beams=CAPTION_BEAMS, max_length=CAPTION_MAX_LENGTH,
            min_length=CAPTION_MIN_LENGTH
        )

    description = f"caption: beam search ({CAPTION_BEAMS} beams, length {CAPTION_MIN_LENGTH}-{CAPTION_MAX_LENGTH})"
    return Step(description, run, inputs.batch_size)


def vqa_step(model: BlipVQA, inputs: StepInputs) -> Step:
    """``predict_answers`` with ``inference_method="rank"`` over an answer list the size of VQAv2's."""
    generator = torch.Generator().manual_seed(inputs.seed)
    images = random_images(inputs, generator)
    questions = vocabulary_sentences(model.tokenizer, inputs.batch_size, QUESTION_WORDS, inputs.seed)
    rng = random.Random(inputs.seed)
    words = vocabulary_sentences(model.tokenizer, VQA_ANSWER_LIST_SIZE, 1, inputs.seed + 1)
    answers = [" ".join([word] + rng.sample(words, rng.choice((0, 0, 1, 2)))) for word in words]

    def run():
        samples = {"image": images, "text_input": list(questions)}
        return model.predict_answers(
            samples, inference_method="rank", answer_list=answers, num_ans_candidates=inputs.candidates
        )

    return Step(f"vqa: rank {inputs.candidates} of {len(answers)} answers", run, inputs.batch_size)


def nlvr_step(model: BlipNLVR, inputs: StepInputs) -> Step:
    """``model.predict`` (the evaluation forward) on image pairs and a statement each."""
    generator = torch.Generator().manual_seed(inputs.seed)
    samples = {
        "image0": random_images(inputs, generator),
        "image1": random_images(inputs, generator),
        "text_input": vocabulary_sentences(model.tokenizer, inputs.batch_size, STATEMENT_WORDS, inputs.seed),
        "label": torch.zeros(inputs.batch_size, dtype=torch.long, device=inputs.device),
    }
    return Step("nlvr2: forward on image pairs", lambda: model.predict(dict(samples)), inputs.batch_size, 2)


# LAVIS parent class -> its inference step; a new model family adds its class here
TASK_STEPS = (
    (BlipRetrieval, retrieval_step),
    (BlipCaption, caption_step),
    (BlipVQA, vqa_step),
    (BlipNLVR, nlvr_step),
    (CLIP, clip_retrieval_step),
)

DEFAULT_CANDIDATES = {BlipRetrieval: 256, BlipVQA: 128}


def task_step(model, inputs: StepInputs) -> Step:
    """The inference step of ``model``'s task (found from its LAVIS class)."""
    for cls, build in TASK_STEPS:
        if isinstance(model, cls):
            return build(model, inputs)
    known = ", ".join(cls.__name__ for cls, _ in TASK_STEPS)
    raise SettingError(f"no benchmark step for {type(model).__name__}: the bench knows {known}")


def default_candidates(model) -> int:
    """LAVIS's evaluation candidate count for the model's task (1 where the task has none)."""
    for cls, count in DEFAULT_CANDIDATES.items():
        if isinstance(model, cls):
            return count
    return 1
