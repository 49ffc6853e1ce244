"""DLIP's distillation terms (reduce/dlip.py) against values computed independently with python ``math`` loops."""
import math
import re

import pytest
import torch

from lavis_accel.errors import SettingError
from lavis_accel.reduce import dlip

F64 = torch.float64


# ---- independent references: plain python on nested lists ----

def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _softmax(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _row_kl(student_row, teacher_row, temperature):
    """KL(softmax(teacher / T) || softmax(student / T)) of one row."""
    p = _softmax([v / temperature for v in teacher_row])
    q = _softmax([v / temperature for v in student_row])
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def _tensor(values, requires_grad=False):
    return torch.tensor(values, dtype=F64, requires_grad=requires_grad)


# ---- terms 1-4: cosine ----

def test_cosine_feature_loss_by_hand():
    student = _tensor([[3.0, 4.0], [1.0, 0.0]])
    teacher = _tensor([[4.0, 3.0], [-1.0, 0.0]])  # cosines 24/25 and -1
    loss = dlip.cosine_feature_loss(student, teacher)
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(((1 - 24 / 25) + 2.0) / 2, abs=1e-12)


def test_cosine_feature_loss_is_cosine_embedding_loss_with_target_one():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=gen, dtype=F64), torch.randn(5, 7, generator=gen, dtype=F64) * 3
    expected = torch.nn.CosineEmbeddingLoss(margin=0.25)(student, teacher, torch.ones(5, dtype=F64))
    torch.testing.assert_close(dlip.cosine_feature_loss(student, teacher), expected)
    by_loops = sum(1 - _dot(s, t) / math.sqrt(_dot(s, s) * _dot(t, t)) for s, t in zip(student.tolist(),
                                                                                     teacher.tolist())) / 5
    assert dlip.cosine_feature_loss(student, teacher).item() == pytest.approx(by_loops, abs=1e-12)


def test_cosine_feature_loss_zero_for_equal_directions_and_grad_reaches_the_student():
    student = _tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 2.0]], requires_grad=True)
    assert dlip.cosine_feature_loss(student, student.detach() * 4).item() == pytest.approx(0.0, abs=1e-12)
    dlip.cosine_feature_loss(student, _tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])).backward()
    assert student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="student \\(2, 3\\), teacher \\(2, 2\\)"):
        dlip.cosine_feature_loss(student, _tensor([[1.0, 0.0], [0.0, 1.0]]))


# ---- term 5: ITC distillation ----

ITC = dict(
    image_feat=[[1.0, 0.0], [0.6, 0.8]],
    text_feat=[[0.8, 0.6], [0.0, -1.0]],
    teacher_image_feat=[[0.96, 0.28], [0.0, 1.0]],
    teacher_text_feat=[[0.6, 0.8], [-0.28, -0.96]],
    image_queue=[[0.8, -1.0], [-0.6, 0.0]],  # [E=2, Q=2]: columns are queued features
    text_queue=[[0.0, 0.28], [1.0, 0.96]],
)


def _itc_by_loops(values, temp, alpha):
    """(loss, d loss / d temp) with the targets held constant."""
    batch = len(values["image_feat"])

    def direction(queries, teacher_queries, teacher_keys, queue):
        keys = teacher_keys + [list(column) for column in zip(*queue)]
        loss = grad_temp = 0.0
        for i in range(batch):
            teacher_probs = _softmax([_dot(teacher_queries[i], k) / temp for k in keys])
            targets = [alpha * p + (1 - alpha) * (1.0 if j == i else 0.0) for j, p in enumerate(teacher_probs)]
            logits = [_dot(queries[i], k) / temp for k in keys]
            probs = _softmax(logits)
            loss -= sum(t * math.log(p) for t, p in zip(targets, probs)) / batch
            # d/dz of the soft cross-entropy is (p - t); dz/dtemp = -z / temp
            grad_temp += sum((p - t) * (-z / temp) for p, t, z in zip(probs, targets, logits)) / batch
        return loss, grad_temp

    i2t = direction(values["image_feat"], values["teacher_image_feat"], values["teacher_text_feat"],
                    values["text_queue"])
    t2i = direction(values["text_feat"], values["teacher_text_feat"], values["teacher_image_feat"],
                    values["image_queue"])
    return (i2t[0] + t2i[0]) / 2, (i2t[1] + t2i[1]) / 2


def test_itc_distillation_loss_and_its_temperature_gradient_by_hand():
    inputs = {name: _tensor(v, requires_grad=True) for name, v in ITC.items()}
    temp = _tensor(0.5, requires_grad=True)
    loss = dlip.itc_distillation_loss(**inputs, temp=temp, alpha=0.4)
    assert loss.dtype == F64
    expected_loss, expected_grad_temp = _itc_by_loops(ITC, 0.5, 0.4)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    loss.backward()
    # the targets are detached: temp's gradient comes through the student logits only
    assert temp.grad.item() == pytest.approx(expected_grad_temp, abs=1e-12)
    assert inputs["image_feat"].grad.abs().sum() > 0 and inputs["text_feat"].grad.abs().sum() > 0
    for name in ("teacher_image_feat", "teacher_text_feat", "image_queue", "text_queue"):
        assert inputs[name].grad is None, name


def test_itc_distillation_with_alpha_zero_is_plain_contrastive_cross_entropy():
    inputs = {name: _tensor(v) for name, v in ITC.items()}
    loss = dlip.itc_distillation_loss(**inputs, temp=_tensor(0.2), alpha=0.0)
    logits_i2t = inputs["image_feat"] @ torch.cat([inputs["teacher_text_feat"].t(), inputs["text_queue"]], 1) / 0.2
    logits_t2i = inputs["text_feat"] @ torch.cat([inputs["teacher_image_feat"].t(), inputs["image_queue"]], 1) / 0.2
    labels = torch.arange(2)
    expected = (torch.nn.functional.cross_entropy(logits_i2t, labels)
                + torch.nn.functional.cross_entropy(logits_t2i, labels)) / 2
    torch.testing.assert_close(loss, expected)


def test_itc_distillation_rejects_unpaired_features():
    inputs = {name: _tensor(v) for name, v in ITC.items()}
    inputs["teacher_text_feat"] = inputs["teacher_text_feat"][:1]
    with pytest.raises(ValueError, match="text ITC features differ in shape"):
        dlip.itc_distillation_loss(**inputs, temp=0.07, alpha=0.4)


# ---- term 6: LM logits ----

def test_logit_distillation_loss_by_hand_drops_the_last_position():
    student = [[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [50.0, -9.0, 3.0]]]  # B=1, L=3, V=3; position 2 is dropped
    teacher = [[[0.0, 2.0, 1.0], [1.0, -1.0, 0.0], [-7.0, 40.0, 0.0]]]
    for temperature in (1.0, 2.0):
        expected = sum(_row_kl(s, t, temperature) for s, t in zip(student[0][:2], teacher[0][:2])) / 2
        loss = dlip.logit_distillation_loss(_tensor(student), _tensor(teacher), temperature)
        assert loss.dtype == F64
        assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_logit_distillation_counts_every_row_and_is_zero_for_equal_logits():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 5, generator=gen, dtype=F64, requires_grad=True)
    teacher = torch.randn(2, 4, 5, generator=gen, dtype=F64)
    rows = [(s, t) for b in range(2) for s, t in zip(student[b, :3].tolist(), teacher[b, :3].tolist())]
    expected = sum(_row_kl(s, t, 1.0) for s, t in rows) / 6  # B * (L - 1) rows
    loss = dlip.logit_distillation_loss(student, teacher)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert student.grad[:, :3].abs().sum() > 0 and student.grad[:, 3].abs().sum() == 0
    assert dlip.logit_distillation_loss(teacher, teacher.clone()).item() == 0.0


def test_logit_distillation_half_precision_is_computed_in_float32():
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    loss = dlip.logit_distillation_loss(student.bfloat16(), teacher.bfloat16())
    assert loss.dtype == torch.float32
    exact = dlip.logit_distillation_loss(student.bfloat16().double(), teacher.bfloat16().double())
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)


def test_logit_distillation_needs_two_positions():
    with pytest.raises(ValueError, match="L >= 2"):
        dlip.logit_distillation_loss(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))


# ---- terms 7-9: attention maps ----

def test_attention_distillation_loss_by_hand():
    student = [[[[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], [[1.0, 0.0, 0.0], [0.4, 0.4, 0.2]]]]  # B=1, H=2, Lq=2, Lk=3
    teacher = [[[[0.6, 0.2, 0.2], [0.1, 0.2, 0.7]], [[0.3, 0.3, 0.4], [0.0, 0.5, 0.5]]]]
    rows = [(s, t) for sh, th in zip(student[0], teacher[0]) for s, t in zip(sh, th)]
    for temperature in (0.05, 1.0):
        expected = sum(_row_kl(s, t, temperature) for s, t in rows) / 4  # B * H * Lq rows
        loss = dlip.attention_distillation_loss(_tensor(student), _tensor(teacher), temperature)
        assert loss.dtype == F64
        assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert dlip.attention_distillation_loss(_tensor(teacher), _tensor(teacher)).item() == 0.0


def test_attention_distillation_gradient_reaches_the_student_map():
    student = torch.softmax(torch.randn(2, 3, 4, 5, dtype=F64), -1).requires_grad_()
    teacher = torch.softmax(torch.randn(2, 3, 4, 5, dtype=F64), -1)
    dlip.attention_distillation_loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("student_shape, teacher_shape, message", [
    ((2, 6, 30, 30), (2, 12, 30, 30),
     "attention maps differ in heads: student 6, teacher 12 (attention distillation pairs the maps one to one)"),
    ((2, 12, 30, 197), (2, 12, 35, 197), "attention maps differ in query length: student 30, teacher 35"),
    ((2, 12, 30, 197), (2, 12, 30, 577), "attention maps differ in key length: student 197, teacher 577"),
    ((2, 12, 30, 30), (12, 30, 30), "teacher attention map must be [B, H, Lq, Lk]"),
])
def test_attention_distillation_names_the_mismatched_dimension(student_shape, teacher_shape, message):
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        dlip.attention_distillation_loss(torch.rand(*student_shape), torch.rand(*teacher_shape))
    assert isinstance(caught.value, SettingError) and "\n" not in str(caught.value)


# ---- the sigmoid option ----

SIG_IMAGE = [[1.0, 0.0], [0.6, 0.8]]
SIG_TEXT = [[0.8, 0.6], [0.0, -1.0]]
SIG_TEACHER_IMAGE = [[0.96, 0.28], [0.0, 1.0]]
SIG_TEACHER_TEXT = [[0.6, 0.8], [-0.28, -0.96]]


def _sigmoid_logits_by_loops(image, text, scale, bias):
    return [[math.exp(scale) * _dot(t, i) + bias for i in image] for t in text]  # rows are texts


def test_sigmoid_contrastive_loss_by_hand():
    logits = _sigmoid_logits_by_loops(SIG_IMAGE, SIG_TEXT, math.log(2.0), -1.0)
    expected = sum(math.log1p(math.exp(-(1.0 if i == j else -1.0) * z))
                   for i, row in enumerate(logits) for j, z in enumerate(row)) / 2
    scale, bias = _tensor(math.log(2.0), requires_grad=True), _tensor(-1.0, requires_grad=True)
    image, text = _tensor(SIG_IMAGE, requires_grad=True), _tensor(SIG_TEXT, requires_grad=True)
    loss = dlip.sigmoid_contrastive_loss(image, text, scale, bias)
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    for tensor in (scale, bias, image, text):
        assert tensor.grad.abs().sum() > 0


def test_sigmoid_distillation_loss_and_its_gradients_by_hand():
    scale_value, bias_value = math.log(3.0), -0.5
    student_logits = _sigmoid_logits_by_loops(SIG_IMAGE, SIG_TEXT, scale_value, bias_value)
    teacher_logits = _sigmoid_logits_by_loops(SIG_TEACHER_IMAGE, SIG_TEACHER_TEXT, scale_value, bias_value)
    expected = grad_bias = grad_scale = 0.0
    for i in range(2):
        for j in range(2):
            p_t, p_s = _sigmoid(teacher_logits[i][j]), _sigmoid(student_logits[i][j])
            expected += (p_t * math.log(p_t / p_s) + (1 - p_t) * math.log((1 - p_t) / (1 - p_s))) / 2
            # with p_t held constant, d KL / d z_s = p_s - p_t
            grad_bias += (p_s - p_t) / 2
            grad_scale += (p_s - p_t) * (student_logits[i][j] - bias_value) / 2
    scale, bias = _tensor(scale_value, requires_grad=True), _tensor(bias_value, requires_grad=True)
    image, text = _tensor(SIG_IMAGE, requires_grad=True), _tensor(SIG_TEXT, requires_grad=True)
    teacher_image = _tensor(SIG_TEACHER_IMAGE, requires_grad=True)
    teacher_text = _tensor(SIG_TEACHER_TEXT, requires_grad=True)
    loss = dlip.sigmoid_distillation_loss(image, text, teacher_image, teacher_text, scale, bias)
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert bias.grad.item() == pytest.approx(grad_bias, abs=1e-12)
    assert scale.grad.item() == pytest.approx(grad_scale, abs=1e-12)
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    assert teacher_image.grad is None and teacher_text.grad is None


def test_sigmoid_distillation_is_zero_for_equal_features_and_finite_when_saturated():
    image, text = _tensor(SIG_IMAGE), _tensor(SIG_TEXT)
    scale, bias = _tensor(0.0), _tensor(0.3)
    assert dlip.sigmoid_distillation_loss(image, text, image.clone(), text.clone(), scale, bias).item() == 0.0
    # exp(10) * cosines: logits in the thousands, where sigmoid rounds to exactly 0 or 1
    big_scale = _tensor(10.0, requires_grad=True)
    student_image = _tensor(SIG_IMAGE, requires_grad=True)
    loss = dlip.sigmoid_distillation_loss(student_image, text, _tensor(SIG_TEACHER_IMAGE), text, big_scale, bias)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(big_scale.grad) and torch.isfinite(student_image.grad).all()
