"""Helpers shared by the tests of the registered BLIP variants: their task outputs, to compare with the parent's.

Each task helper takes its inputs (images, questions, texts) from the calling test file, which keeps its own: what a
test pins depends on them (e.g. the MADTP tests need questions long enough to be pruned).
"""
from types import SimpleNamespace

import torch

import lavis_accel  # noqa: F401  (first: makes torchvision importable for LAVIS)
from lavis.models.base_model import BaseModel
from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE, build_tiny

TEXTS = ["a red circle at the top left", "two blue squares", "a green triangle in the middle",
         "a yellow star on the right", "a purple square at the bottom"]
ANSWER_LIST = ["red", "blue", "green", "2", "3", "yes", "no"]


def build_seeded(arch, model_type, *, seed=0, is_eval=True, **overrides):
    """``build_tiny`` after ``torch.manual_seed(seed)``: the same random weights on every call with the same seed."""
    torch.manual_seed(seed)
    return build_tiny(arch, model_type, is_eval=is_eval, **overrides)


def random_images(count, seed):
    """``count`` random tiny images, the same for the same seed (a generator of their own: no global RNG use)."""
    return torch.randn(count, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


class BatchesLoader:
    """What LAVIS's ``compute_sim_matrix`` reads from a retrieval loader: ``dataset.text``/``.image`` and batches."""

    def __init__(self, batches, texts):
        self.batches = batches
        self.dataset = SimpleNamespace(text=texts, image=list(range(sum(len(batch) for batch in batches))))

    def __iter__(self):
        for images in self.batches:
            yield {"image": images}


def retrieval_outputs(model, batches, texts=TEXTS):
    """LAVIS's two-stage retrieval scores (ITC top-2 re-ranked by ITM) of the images in ``batches`` against texts."""
    i2t, t2i = model.compute_sim_matrix(BatchesLoader(batches, texts), SimpleNamespace(k_test=2))
    return {"discrete": [], "continuous": [torch.as_tensor(i2t), torch.as_tensor(t2i)]}


def caption_outputs(model, images):
    """Beam-search captions, and the teacher-forced loss of those captions (their score under the model)."""
    captions = model.generate({"image": images}, num_beams=3, max_length=12, min_length=4)
    loss = model({"image": images, "text_input": captions}).loss
    return {"discrete": captions, "continuous": [loss]}


def vqa_batch(images, questions):
    """A VQA training batch: two questions, the first with one answer and the second with two weighted ones."""
    return {"image": images, "text_input": questions, "answer": ["red", "2", "two"],
            "weight": torch.tensor([1.0, 0.5, 0.5]), "n_answers": torch.tensor([1, 2])}


def vqa_outputs(model, images, questions, *, generate=False):
    """Rank-mode answers (LAVIS's VQAv2 evaluation), then generated ones if ``generate``, and the answer loss."""
    answers = model.predict_answers({"image": images, "text_input": questions}, inference_method="rank",
                                    answer_list=ANSWER_LIST, num_ans_candidates=4)
    if generate:
        answers = answers + model.predict_answers({"image": images, "text_input": questions},
                                                  inference_method="generate", max_len=5)
    loss = model(vqa_batch(images, questions)).loss
    return {"discrete": answers, "continuous": [loss]}


def nlvr_batch(seeds, texts):
    """An NLVR2 batch of two image pairs (``random_images`` of the two seeds) with ``texts`` and labels 0, 1."""
    seed0, seed1 = seeds
    return {"image0": random_images(2, seed=seed0), "image1": random_images(2, seed=seed1),
            "text_input": texts, "label": torch.tensor([0, 1])}


def nlvr_outputs(model, samples):
    """NLVR2 logits of ``samples``."""
    return {"discrete": [], "continuous": [model.predict(samples)["predictions"]]}


def training_batch(task, images, *, vqa, nlvr):
    """A training batch for ``task`` (a parent arch): retrieval's and captioning's on ``images`` with two of TEXTS,
    VQA's and NLVR2's the batches given (``vqa``, ``nlvr``)."""
    if task == "blip_retrieval":
        return {"image": images, "text_input": TEXTS[:2], "image_id": torch.tensor([0, 1]),
                "epoch": 0, "iters": 0, "num_iters_per_epoch": 10}
    if task == "blip_caption":
        return {"image": images, "text_input": TEXTS[:2]}
    return {"blip_vqa": vqa, "blip_nlvr": nlvr}[task]


def outputs_by_arch(task_outputs):
    """``outputs(arch, model)``: ``task_outputs[arch](model)`` without gradients, torch's RNG seeded 0 first (so that a
    variant and its parent draw alike)."""

    def outputs(arch, model):
        torch.manual_seed(0)
        with torch.no_grad():
            return task_outputs[arch](model)

    return outputs


def record_load_results(monkeypatch):
    """The ``load_state_dict`` result of every ``BaseModel.load_checkpoint`` call (LAVIS only logs it), from now on."""
    results = []
    stock_load_checkpoint = BaseModel.load_checkpoint

    def recording_load_checkpoint(self, url_or_filename):
        results.append(stock_load_checkpoint(self, url_or_filename))
        return results[-1]

    monkeypatch.setattr(BaseModel, "load_checkpoint", recording_load_checkpoint)
    return results
