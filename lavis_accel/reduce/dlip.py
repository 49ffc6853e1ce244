"""DLIP's distillation terms in plain torch: feature cosines, ITC and LM-logit distillation, attention-map KD, and
the sigmoid (SigLIP-style) option.

DLIP (Kuang et al., arXiv 2308.12956) distils a frozen BLIP ViT-B teacher into a ViT-S / BERT-small student. The
paper's code was not found; these follow the replication jfan1256/dlip-v2 (``models/dlip_pretrain.py`` ``forward``
and ``models/dlip_pretrain_sigmoid.py``), whose ``loss_dist`` is the unweighted sum of nine terms:

1-4. ``cosine_feature_loss`` on the image and text ITC features, the projected ITM [CLS] and the projected
     decoder state at position 0;
5.   ``itc_distillation_loss``: the student's contrastive logits against the teacher's soft targets;
6.   ``logit_distillation_loss``: KL between the decoders' next-token distributions;
7-9. ``attention_distillation_loss``: KL between the last layer's attention maps (text self-attention,
     cross-attention to the image tokens, decoder self-attention).

The sigmoid variant replaces ITA by ``sigmoid_contrastive_loss`` and term 5 by ``sigmoid_distillation_loss``.

Teacher tensors are expected without grad (the teacher is frozen and run under ``no_grad``); only the *targets*
built inside ``itc_distillation_loss`` and ``sigmoid_distillation_loss`` are detached here, because they reuse the
student's queues, temperature, scale and bias, which do carry grad. Every function works in the inputs' dtype
(float64 included); half-precision inputs are computed in float32.
"""
from typing import Union

import torch
import torch.nn.functional as F

from lavis_accel.errors import SettingError
from lavis_accel.reduce.merge import at_least_float32

_ATTENTION_DIMS = ("batch", "heads", "query length", "key length")


def _same_shape(what: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """One-line error when paired student/teacher tensors differ in shape (broadcasting would hide it)."""
    if student.shape != teacher.shape:
        raise SettingError(
            f"{what} differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )


def _detached(value: Union[torch.Tensor, float]) -> Union[torch.Tensor, float]:
    """``value`` cut from the graph when it is a tensor (a plain float passes through)."""
    return value.detach() if isinstance(value, torch.Tensor) else value


def _row_kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sum_rows KL(softmax(teacher / T) || softmax(student / T))`` over the last dim, in float32 at least.

    Both sides go through ``log_softmax`` so the KL is finite and exactly 0 when the two sides are equal.
    """
    student_log = F.log_softmax(at_least_float32(student_logits) / temperature, dim=-1)
    teacher_log = F.log_softmax(at_least_float32(teacher_logits) / temperature, dim=-1)
    return F.kl_div(student_log, teacher_log, reduction="sum", log_target=True)


def cosine_feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Terms 1-4: mean over rows of ``1 - cos(student_i, teacher_i)`` for ``[B, D]`` features.

    Computed by the reference's very function, ``CosineEmbeddingLoss(margin=0.25)`` with target +1 (the margin only
    acts on target -1, so it plays no part; torch adds 1e-12 to both squared norms, so equal inputs give ~1e-12, not
    0). Inputs need not be normalised. Nothing is detached: the caller passes teacher features computed without grad.
    """
    _same_shape("cosine distillation features", student, teacher)
    target = torch.ones(student.shape[0], dtype=student.dtype, device=student.device)
    return F.cosine_embedding_loss(student, teacher, target, margin=0.25)


def _soft_contrastive_targets(
    query: torch.Tensor, keys: torch.Tensor, temp: Union[torch.Tensor, float], alpha: float
) -> torch.Tensor:
    """``alpha * softmax(query @ keys / temp) + (1 - alpha) * one-hot`` on the first ``B`` columns, without grad."""
    with torch.no_grad():
        probs = F.softmax(query.detach() @ keys.detach() / _detached(temp), dim=1)
        one_hot = torch.zeros_like(probs)
        one_hot[:, : query.shape[0]].fill_diagonal_(1.0)
        return alpha * probs + (1.0 - alpha) * one_hot


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Row-mean of ``-sum(targets * log_softmax(logits))``."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def itc_distillation_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    teacher_image_feat: torch.Tensor,
    teacher_text_feat: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: Union[torch.Tensor, float],
    alpha: float,
) -> torch.Tensor:
    """Term 5: the student's ITC logits against the teacher's soft targets, averaged over both directions.

    Features ``[B, E]`` are normalised; the queues ``[E, Q]`` are the *student's*, and ``temp`` is the student's
    temperature, both also used for the teacher's targets (a faithful oddity of the reference). Student logits
    ``i2t = image_feat @ [teacher_text_feat^T, text_queue] / temp`` (``t2i`` alike); targets
    ``alpha * softmax(teacher_image_feat @ [teacher_text_feat^T, text_queue] / temp) + (1 - alpha) * one-hot``.
    The targets and the teacher keys in the student logits are detached: gradient reaches the student features
    and ``temp`` only.
    """
    _same_shape("image ITC features", image_feat, teacher_image_feat)
    _same_shape("text ITC features", text_feat, teacher_text_feat)
    image_feat, text_feat = at_least_float32(image_feat), at_least_float32(text_feat)
    dtype = image_feat.dtype
    teacher_image, teacher_text = teacher_image_feat.detach().to(dtype), teacher_text_feat.detach().to(dtype)
    text_keys = torch.cat([teacher_text.t(), text_queue.detach().to(dtype)], dim=1)
    image_keys = torch.cat([teacher_image.t(), image_queue.detach().to(dtype)], dim=1)
    i2t_targets = _soft_contrastive_targets(teacher_image, text_keys, temp, alpha)
    t2i_targets = _soft_contrastive_targets(teacher_text, image_keys, temp, alpha)
    loss_i2t = _soft_cross_entropy(image_feat @ text_keys / temp, i2t_targets)
    loss_t2i = _soft_cross_entropy(text_feat @ image_keys / temp, t2i_targets)
    return (loss_i2t + loss_t2i) / 2


def logit_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Term 6: ``KL(softmax(teacher / T) || softmax(student / T))`` of the decoders' ``[B, L, V]`` logits.

    The last position predicts nothing and is dropped; every other position counts, padding included (as the
    reference). The KL is summed and divided by the number of rows ``B * (L - 1)``.
    """
    _same_shape("decoder logits", student_logits, teacher_logits)
    if student_logits.dim() != 3 or student_logits.shape[1] < 2:
        raise SettingError(
            f"decoder logits must be [B, L, V] with L >= 2 for logit distillation, got {tuple(student_logits.shape)}"
        )
    vocab = student_logits.shape[-1]
    student_rows = student_logits[:, :-1].reshape(-1, vocab)
    teacher_rows = teacher_logits[:, :-1].reshape(-1, vocab)
    return _row_kl_sum(student_rows, teacher_rows, temperature) / student_rows.shape[0]


def _check_attention_shapes(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> None:
    """One-line error naming the first dimension in which the ``[B, H, Lq, Lk]`` maps differ."""
    for name, probs in (("student", student_probs), ("teacher", teacher_probs)):
        if probs.dim() != 4:
            raise SettingError(f"{name} attention map must be [B, H, Lq, Lk], got {tuple(probs.shape)}")
    for dim, name in enumerate(_ATTENTION_DIMS):
        if student_probs.shape[dim] != teacher_probs.shape[dim]:
            raise SettingError(
                f"attention maps differ in {name}: student {student_probs.shape[dim]}, "
                f"teacher {teacher_probs.shape[dim]} (attention distillation pairs the maps one to one)"
            )


def attention_distillation_loss(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 0.05
) -> torch.Tensor:
    """Terms 7-9: KL between the last layer's attention maps ``[B, H, Lq, Lk]``, row by row.

    As in the reference, the *probabilities* are treated as logits: each key row becomes
    ``softmax(probs / T)`` (T = 0.05 sharpens it again), and ``KL(teacher || student)`` is summed and divided by
    the number of rows ``B * H * Lq``. The maps pair head by head, so every dimension must match.
    """
    _check_attention_shapes(student_probs, teacher_probs)
    keys = student_probs.shape[-1]
    student_rows = student_probs.reshape(-1, keys)
    teacher_rows = teacher_probs.reshape(-1, keys)
    return _row_kl_sum(student_rows, teacher_rows, temperature) / student_rows.shape[0]


def _sigmoid_logits(
    image_feat: torch.Tensor, text_feat: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's pair logits ``[B, B]`` (rows are texts): ``text @ image^T * exp(logit_scale) + logit_bias``."""
    image_feat, text_feat = at_least_float32(image_feat), at_least_float32(text_feat)
    return text_feat @ image_feat.t() * logit_scale.exp() + logit_bias


def sigmoid_contrastive_loss(
    image_feat: torch.Tensor, text_feat: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """The sigmoid option's replacement for ITA: ``-sum(logsigmoid(labels * logits)) / B``.

    ``labels`` is +1 on the matching pairs (the diagonal) and -1 elsewhere; every one of the ``B * B`` pairs is an
    independent binary decision, so no softmax over the batch is needed.
    """
    if image_feat.shape != text_feat.shape:
        raise SettingError(
            f"sigmoid loss pairs image and text features one to one: image {tuple(image_feat.shape)}, "
            f"text {tuple(text_feat.shape)}"
        )
    logits = _sigmoid_logits(image_feat, text_feat, logit_scale, logit_bias)
    labels = 2.0 * torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device) - 1.0
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def sigmoid_distillation_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    teacher_image_feat: torch.Tensor,
    teacher_text_feat: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """ITC distillation of the sigmoid option: Bernoulli ``KL(p_t || p_s)`` summed over the ``B * B`` pairs, / B.

    ``p_t = sigmoid(teacher logits)`` (built with the student's scale and bias, detached) and ``p_s`` the
    student's; ``log p`` and ``log(1 - p)`` come from ``logsigmoid(z)`` and ``logsigmoid(-z)`` so saturated pairs
    stay finite. The reference computes its version under ``no_grad`` with the KL arguments swapped, so it adds a
    constant and trains nothing; here the gradient reaches the student features, scale and bias.
    """
    _same_shape("image sigmoid features", image_feat, teacher_image_feat)
    _same_shape("text sigmoid features", text_feat, teacher_text_feat)
    student = _sigmoid_logits(image_feat, text_feat, logit_scale, logit_bias)
    with torch.no_grad():
        teacher = _sigmoid_logits(
            teacher_image_feat.detach().to(student.dtype), teacher_text_feat.detach().to(student.dtype),
            logit_scale.detach(), logit_bias.detach(),
        )
        teacher_prob, teacher_log, teacher_log_not = teacher.sigmoid(), F.logsigmoid(teacher), F.logsigmoid(-teacher)
    kl = teacher_prob * (teacher_log - F.logsigmoid(student)) + (1.0 - teacher_prob) * (
        teacher_log_not - F.logsigmoid(-student)
    )
    return kl.sum() / student.shape[0]
