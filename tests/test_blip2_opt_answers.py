"""``Blip2OPT.predict_answers`` (``lavis_accel.models.blip2_opt_answers``) on the tiny BLIP-2 OPT.

Pinned here: one stripped answer per question; left padding leaves each answer as the question alone gets it (greedy
and beam search); the prompt formatting; the tokenizer's padding side and the stock ``generate`` are left as they
were; LAVIS's ``vqa``/``gqa`` tasks answer through it; the addition is guarded (an existing ``predict_answers`` is
kept) and idempotent; ``apply_lemmatizer`` from the model config and from the batch, with a fake spaCy pipeline (the
real ``en_core_web_sm`` is not installed here); the pre-flight check and each bad setting in one line.
"""
import inspect
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from lavis.models.blip2_models import blip2_opt
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.tasks.vqa import GQATask, VQATask

import lavis_accel  # noqa: F401  (before the plugin's modules, as the CLI imports them)
from lavis_accel.errors import SettingError
from lavis_accel.models import blip2_opt_answers as answers_module
from lavis_accel.models.blip2_opt_answers import (
    LEMMATIZER_MISSING, add_predict_answers, check_lemmatizer, lemmatizer_available)
from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE, build_tiny

PROMPT = "Question: {} Short answer:"
SHORT = "what color is it?"
LONG = "how many red circles are there in the picture at the top left corner?"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_tiny("blip2_opt", "pretrain_opt2.7b", is_eval=True)


def images(n, seed=0):
    return torch.randn(n, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def answer(model, image, questions, **kwargs):
    return model.predict_answers({"image": image, "text_input": questions}, max_len=6, **kwargs)


class FakeLemmatizer:
    """A spaCy-like pipeline: whitespace tokens, tagged by ``tag``."""

    TAGS = {"dogs": ("NOUN", "dog"), "running": ("VERB", "run"), "fast": ("ADV", "fastly")}

    @classmethod
    def tag(cls, word):
        """(part of speech, lemma): from ``TAGS``, else a noun whose lemma is the word in angle brackets."""
        return cls.TAGS.get(word, ("NOUN", f"<{word}>"))

    def __call__(self, text):
        return [SimpleNamespace(text=word, pos_=self.tag(word)[0], lemma_=self.tag(word)[1]) for word in text.split()]


def fake_lemmatized(text):
    """What lemmatising ``text`` with ``FakeLemmatizer`` gives: lemmas of nouns and verbs, other words as they are."""
    return " ".join(lemma if pos in ("NOUN", "VERB") else word
                    for word, (pos, lemma) in ((word, FakeLemmatizer.tag(word)) for word in text.split()))


# --- answers --------------------------------------------------------------------------------------------------------

def test_one_stripped_answer_per_question(model):
    questions = [SHORT, LONG, "is the big circle on the left?"]
    assert len({len(model.opt_tokenizer(PROMPT.format(q)).input_ids) for q in questions}) == 3  # the batch is padded
    answers = answer(model, images(3), questions, num_beams=2, prompt=PROMPT)
    assert len(answers) == 3 and all(isinstance(text, str) for text in answers)
    assert all(text == text.strip() and "\n" not in text for text in answers)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_left_padding_does_not_change_answers(model, num_beams):
    image = images(2)
    batch = answer(model, image, [SHORT, LONG], num_beams=num_beams, prompt=PROMPT)
    alone = [answer(model, image[i:i + 1], [question], num_beams=num_beams, prompt=PROMPT)[0]
             for i, question in enumerate([SHORT, LONG])]
    assert batch == alone


def test_prompt_formats_each_question(model):
    image = images(2)
    formatted = answer(model, image, [PROMPT.format(SHORT), PROMPT.format(LONG)], num_beams=1)
    assert answer(model, image, [SHORT, LONG], num_beams=1, prompt=PROMPT) == formatted
    assert answer(model, image[:1], SHORT, num_beams=1, prompt=PROMPT) == formatted[:1]  # one question as a str


def test_answer_follows_the_prompt_tokens(model, monkeypatch):
    """The decoded answer is exactly the generated tokens after the (padded) question, stripped."""
    tokenizer = model.opt_tokenizer
    new_tokens = tokenizer(" blue cat\n", add_special_tokens=False).input_ids

    def generate(input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([new_tokens] * input_ids.shape[0])], dim=1)

    monkeypatch.setattr(model.opt_model, "generate", generate)
    assert answer(model, images(2), [SHORT, LONG], prompt=PROMPT) == ["blue cat", "blue cat"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_side_and_stock_generate_are_left_as_they_were(model, side):
    tokenizer = model.opt_tokenizer
    tokenizer.padding_side = side
    try:
        captions = model.generate({"image": images(2)}, num_beams=2, max_length=5)
        answer(model, images(2), [SHORT, LONG], num_beams=2, prompt=PROMPT)
        assert tokenizer.padding_side == side
        assert model.generate({"image": images(2)}, num_beams=2, max_length=5) == captions
        with pytest.raises(ValueError):  # the tokenizer refuses a non-text question: the side is still restored
            answer(model, images(1), [None])
        assert tokenizer.padding_side == side
    finally:
        tokenizer.padding_side = "right"


def test_lavis_vqa_and_gqa_tasks_answer_through_it(model):
    image = images(2)
    samples = {"image": image, "text_input": [SHORT, LONG], "question_id": torch.tensor([7, 9]),
               "answer": ["red", "two"]}
    expected = answer(model, image, [SHORT, LONG], num_beams=2, prompt=PROMPT)
    settings = dict(num_beams=2, max_len=6, min_len=1, evaluate=True, num_ans_candidates=128,
                    inference_method="generate", prompt=PROMPT)
    vqa = VQATask(**settings).valid_step(model, dict(samples))
    assert vqa == [{"question_id": 7, "answer": expected[0]}, {"question_id": 9, "answer": expected[1]}]
    gqa = GQATask(**settings).valid_step(model, dict(samples))
    assert [row["pred_ans"] for row in gqa] == expected and [row["gt_ans"] for row in gqa] == ["red", "two"]


@pytest.mark.parametrize("settings, key", [({"inference_method": "rank"}, "run.inference_method"),
                                           ({"num_beams": 0}, "run.num_beams")])
def test_bad_answer_settings_are_refused_in_one_line(model, settings, key):
    with pytest.raises(SettingError, match=f"^{key}: ") as raised:
        answer(model, images(1), [SHORT], **settings)
    assert "\n" not in str(raised.value)


# --- the guarded addition -------------------------------------------------------------------------------------------

def test_installed_lavis_gets_it_only_without_its_own():
    stock_has_one = "def predict_answers" in inspect.getsource(blip2_opt)
    assert (Blip2OPT.predict_answers is answers_module.predict_answers) is not stock_has_one
    assert add_predict_answers(Blip2OPT) is False  # idempotent: a second call changes nothing
    assert getattr(Blip2OPT.from_config.__func__, "_lavis_accel_reads_apply_lemmatizer", False) is not stock_has_one


def test_existing_predict_answers_is_kept():
    def own_predict_answers(self, samples, **kwargs):
        return ["own"]

    def own_from_config(cls, cfg):
        return cls()

    Answering = type("Answering", (), {"predict_answers": own_predict_answers,
                                       "from_config": classmethod(own_from_config)})
    assert add_predict_answers(Answering) is False
    assert Answering.predict_answers is own_predict_answers
    assert Answering.from_config.__func__ is own_from_config
    assert not hasattr(Answering, "_lemmatize") and not hasattr(Answering, "lemmatizer")


def test_class_without_one_gets_it_once_and_reads_apply_lemmatizer():
    Bare = type("Bare", (), {"from_config": classmethod(lambda cls, cfg: cls())})
    assert add_predict_answers(Bare) is True
    wrapped = Bare.from_config.__func__
    assert add_predict_answers(Bare) is False and Bare.from_config.__func__ is wrapped
    assert Bare.predict_answers is answers_module.predict_answers
    assert Bare.from_config({"apply_lemmatizer": True})._apply_lemmatizer is True
    assert Bare.from_config({})._apply_lemmatizer is False


def test_model_config_sets_apply_lemmatizer():
    assert build_tiny("blip2_opt", "pretrain_opt2.7b", apply_lemmatizer=True)._apply_lemmatizer is True
    with pytest.raises(SettingError, match="^model.apply_lemmatizer: expected True or False, got 'yes'$"):
        build_tiny("blip2_opt", "pretrain_opt2.7b", apply_lemmatizer="yes")


# --- lemmatizer -----------------------------------------------------------------------------------------------------

def test_lemmatize_replaces_nouns_and_verbs(model, monkeypatch):
    monkeypatch.setattr(model, "_lemmatizer", FakeLemmatizer(), raising=False)
    assert model._lemmatize(["dogs running fast", "", "a  cat"]) == ["dog run fast", "", "<a> <cat>"]
    assert fake_lemmatized("dogs running fast cat") == "dog run fast <cat>"


@pytest.mark.parametrize("from_config, from_batch, lemmatized", [
    (True, None, True), (False, True, True), (False, False, False), (False, None, False)])
def test_apply_lemmatizer_from_config_or_batch(model, monkeypatch, from_config, from_batch, lemmatized):
    image = images(2)
    raw = answer(model, image, [SHORT, LONG], num_beams=1, prompt=PROMPT)
    assert any(raw)  # the fake lemmatizer changes every non-empty answer
    monkeypatch.setattr(model, "_lemmatizer", FakeLemmatizer(), raising=False)
    monkeypatch.setattr(model, "_apply_lemmatizer", from_config, raising=False)
    samples = {"image": image, "text_input": [SHORT, LONG]}
    if from_batch is not None:
        samples["apply_lemmatizer"] = from_batch
    answers = model.predict_answers(samples, num_beams=1, max_len=6, prompt=PROMPT)
    assert answers == ([fake_lemmatized(text) for text in raw] if lemmatized else raw)


def test_missing_spacy_model_is_refused_at_first_use(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "en_core_web_sm", None)  # import of it fails, as when it is not installed
    monkeypatch.setattr(model, "_lemmatizer", None, raising=False)
    with pytest.raises(SettingError, match=f"^{re.escape(LEMMATIZER_MISSING)}$"):
        model.predict_answers({"image": images(1), "text_input": [SHORT], "apply_lemmatizer": True}, max_len=3)


def test_lemmatizer_available_looks_for_spacy_and_its_model(tmp_path, monkeypatch):
    for name in ("spacy", "en_core_web_sm"):  # stand-ins, found when the real ones are absent
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert lemmatizer_available() is True
    monkeypatch.setitem(sys.modules, "en_core_web_sm", None)
    assert lemmatizer_available() is False
    monkeypatch.delitem(sys.modules, "en_core_web_sm")
    monkeypatch.setitem(sys.modules, "spacy", None)
    assert lemmatizer_available() is False


def test_check_lemmatizer(monkeypatch):
    monkeypatch.setattr(answers_module, "lemmatizer_available", lambda: False)
    with pytest.raises(SettingError) as raised:
        check_lemmatizer({"apply_lemmatizer": True})
    assert str(raised.value) == ("model.apply_lemmatizer: True needs spaCy's en_core_web_sm "
                                 "(python -m spacy download en_core_web_sm)")
    for cfg in ({}, {"apply_lemmatizer": False}, {"apply_lemmatizer": None}):
        check_lemmatizer(cfg)
    with pytest.raises(SettingError, match="^model.apply_lemmatizer: expected True or False, got 1$"):
        check_lemmatizer({"apply_lemmatizer": 1})
    monkeypatch.setattr(answers_module, "lemmatizer_available", lambda: True)
    check_lemmatizer({"apply_lemmatizer": True})
