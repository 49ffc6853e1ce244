"""``predict_answers`` for LAVIS 1.0.2's BLIP-2 OPT: zero-shot VQA by generation (VQAv2, OK-VQA, GQA).

LAVIS's ``vqa`` and ``gqa`` tasks call ``model.predict_answers``; LAVIS 1.0.2's ``Blip2OPT`` has none (its
``Blip2T5`` has, and later LAVIS releases added one to ``Blip2OPT``). :func:`add_predict_answers` gives the class one,
at import, only when it has none: an installed LAVIS that already answers keeps its own method, untouched.

How the answer is generated, as ``Blip2OPT.generate`` generates a caption:
- the image's query embeddings (ViT, Q-Former, ``opt_proj``) are prepended to the text inside OPT
  (``query_embeds`` of LAVIS's ``modeling_opt``), repeated once per beam; all under ``maybe_autocast``;
- the text is each question, formatted with ``prompt`` when one is given (``"Question: {} Short answer:"``), padded
  on the LEFT, so that every answer starts right after its own question (OPT's positions follow the attention mask,
  so left padding leaves each question's positions as they are alone); the tokenizer's padding side is restored;
- greedy (``num_beams=1``) or beam search, ``max_len`` new tokens, stopping at ``"\\n"`` (the model's
  ``eos_token_id``); the answer is the text after the question tokens, stripped;
- ``length_penalty`` -1 by default (shorter beams win), the default of the BLIText fork's ``predict_answers`` that
  produced P-Former's published zero-shot numbers: LAVIS's ``vqa`` task passes no length penalty (later LAVIS
  releases default to 0).

Lemmatisation (OK-VQA), as ``Blip2T5``: when ``model.apply_lemmatizer`` is true (read from the model config by a
wrapped ``from_config``), or a batch has ``samples["apply_lemmatizer"]`` true, nouns and verbs of each answer are
replaced by their lemma with spaCy's ``en_core_web_sm``. :func:`check_lemmatizer` refuses such a config before a
job starts when spaCy or that model is missing.
"""
import importlib.util

import torch
from lavis.models.blip2_models.blip2_opt import Blip2OPT

from lavis_accel.errors import SettingError

GENERATE = "generate"
LEMMATIZER_MODEL = "en_core_web_sm"
LEMMATIZED_POS = ("NOUN", "VERB")
LEMMATIZER_MISSING = (f"model.apply_lemmatizer: True needs spaCy's {LEMMATIZER_MODEL} "
                      f"(python -m spacy download {LEMMATIZER_MODEL})")


# --- lemmatizer -----------------------------------------------------------------------------------------------------

def lemmatizer_available() -> bool:
    """Whether spaCy and its ``en_core_web_sm`` model can be imported (looked up, not imported: spaCy is slow)."""
    return all(importlib.util.find_spec(name) is not None for name in ("spacy", LEMMATIZER_MODEL))


def apply_lemmatizer_setting(model_cfg) -> bool:
    """The model config's ``apply_lemmatizer`` (False when absent); anything but a boolean is refused."""
    value = model_cfg.get("apply_lemmatizer", False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SettingError(f"model.apply_lemmatizer: expected True or False, got {value!r}")
    return value


def check_lemmatizer(model_cfg):
    """Pre-flight check: refuse ``apply_lemmatizer: True`` when spaCy's ``en_core_web_sm`` cannot be loaded."""
    if apply_lemmatizer_setting(model_cfg) and not lemmatizer_available():
        raise SettingError(LEMMATIZER_MISSING)


def load_lemmatizer():
    """spaCy's ``en_core_web_sm`` pipeline; a one-line ``SettingError`` when it is missing."""
    if not lemmatizer_available():
        raise SettingError(LEMMATIZER_MISSING)
    import spacy

    return spacy.load(LEMMATIZER_MODEL)


def _lemmatizer(self):
    """The model's spaCy pipeline, loaded on first use (a lemmatizer set on the model beforehand is used as is)."""
    if getattr(self, "_lemmatizer", None) is None:
        self._lemmatizer = load_lemmatizer()
    return self._lemmatizer


def _lemmatize(self, answers):
    """Each answer with its nouns and verbs replaced by their lemma, tokens joined by single spaces (as Blip2T5)."""
    def lemmatize(answer):
        return " ".join(token.lemma_ if token.pos_ in LEMMATIZED_POS else token.text
                        for token in self.lemmatizer(answer))

    return [lemmatize(answer) for answer in answers]


def _lemmatize_requested(model, samples) -> bool:
    """Lemmatise when the model was built with ``apply_lemmatizer`` or the batch asks for it."""
    return bool(getattr(model, "_apply_lemmatizer", False) or samples.get("apply_lemmatizer", False))


# --- answering ------------------------------------------------------------------------------------------------------

def _questions(text_input, prompt):
    """The batch's questions as a list, each formatted with ``prompt`` when one is given."""
    questions = [text_input] if isinstance(text_input, str) else list(text_input)
    return [prompt.format(question) for question in questions] if prompt else questions


def _left_padded(tokenizer, texts):
    """Tokenise ``texts`` padded on the left (for generation), leaving the tokenizer's padding side as it was."""
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, padding="longest", return_tensors="pt")
    finally:
        tokenizer.padding_side = padding_side


def _opt_query_inputs(model, image):
    """The image's query embeddings in OPT's space and their attention mask, as ``Blip2OPT.generate`` makes them."""
    image_embeds = model.ln_vision(model.visual_encoder(image))
    image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)
    query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_output = model.Qformer.bert(
        query_embeds=query_tokens,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        return_dict=True,
    )
    inputs_opt = model.opt_proj(query_output.last_hidden_state)
    return inputs_opt, torch.ones(inputs_opt.size()[:-1], dtype=torch.long, device=image.device)


def _check_answer_settings(inference_method, num_beams):
    if inference_method != GENERATE:
        raise SettingError(f"run.inference_method: blip2_opt answers with '{GENERATE}' only, "
                           f"not {inference_method!r} (it has no answer-ranking head)")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise SettingError(f"run.num_beams: expected a whole number >= 1, got {num_beams!r}")


@torch.no_grad()
def predict_answers(
    self,
    samples,
    num_beams=5,
    inference_method="generate",
    max_len=10,
    min_len=1,
    num_ans_candidates=128,
    answer_list=None,
    prompt="",
    length_penalty=-1,
    **kwargs,
):
    """Answer each question of ``samples["text_input"]`` about its image of ``samples["image"]`` by generation.

    Returns a list of answer strings, one per question. ``answer_list`` and ``num_ans_candidates`` (answer ranking)
    are accepted for LAVIS's VQA tasks, which pass them, and unused; ``inference_method`` must be "generate".
    """
    _check_answer_settings(inference_method, num_beams)
    image = samples["image"]
    questions = _questions(samples["text_input"], prompt)
    with self.maybe_autocast():
        query_embeds, query_atts = _opt_query_inputs(self, image)
        tokens = _left_padded(self.opt_tokenizer, questions).to(image.device)
        outputs = self.opt_model.generate(
            input_ids=tokens.input_ids,
            query_embeds=query_embeds.repeat_interleave(num_beams, dim=0),
            attention_mask=torch.cat([query_atts, tokens.attention_mask], dim=1),
            do_sample=False,
            num_beams=num_beams,
            max_new_tokens=max_len,
            min_length=min_len,
            eos_token_id=self.eos_token_id,
            length_penalty=length_penalty,
        )
    answers = self.opt_tokenizer.batch_decode(outputs[:, tokens.input_ids.shape[1]:], skip_special_tokens=True)
    answers = [answer.strip() for answer in answers]
    if _lemmatize_requested(self, samples):
        answers = self._lemmatize(answers)
    return answers


# --- the guarded addition -------------------------------------------------------------------------------------------

def _reading_apply_lemmatizer(stock_from_config):
    """``from_config`` that builds as ``stock_from_config`` does, then records the config's ``apply_lemmatizer``."""
    def from_config(cls, cfg):
        apply_lemmatizer = apply_lemmatizer_setting(cfg)
        model = stock_from_config(cls, cfg)
        model._apply_lemmatizer = apply_lemmatizer
        return model

    from_config.__doc__ = stock_from_config.__doc__
    from_config._lavis_accel_reads_apply_lemmatizer = True
    return from_config


def add_predict_answers(cls) -> bool:
    """Give ``cls`` (a BLIP-2 OPT class) this module's ``predict_answers`` and ``apply_lemmatizer`` support.

    Only when ``cls`` has no ``predict_answers`` of its own or inherited: an existing one (a later LAVIS's) is kept
    and nothing is changed. Returns whether it was added; a second call changes nothing (idempotent).
    """
    if hasattr(cls, "predict_answers"):
        return False
    cls.from_config = classmethod(_reading_apply_lemmatizer(cls.from_config.__func__))
    if not hasattr(cls, "_lemmatize"):
        cls._lemmatize = _lemmatize
    if not hasattr(cls, "lemmatizer"):
        cls.lemmatizer = property(_lemmatizer)
    cls.predict_answers = predict_answers
    return True


add_predict_answers(Blip2OPT)
