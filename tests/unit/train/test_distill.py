"""Knowledge distillation (tldist.train.distill): the loss against its formula, the teacher's view of a
batch, the Distiller and class matching by name."""

from __future__ import annotations

import math

import pytest
import torch

# ------------------------------------------------------------------------------------------ the loss


def test_loss_equals_the_formula_on_a_toy_case():
    from tldist.train.distill import distillation_loss

    s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    t = torch.tensor([[1.0, 1.5, -0.5], [2.0, -1.0, 0.5]])
    labels = torch.tensor([0, 2])
    hard = torch.nn.functional.cross_entropy(s, labels)
    T, alpha = 2.5, 0.3

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kl = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(tr), softmax(sr)))
             for tr, sr in zip(t.tolist(), s.tolist())) / 2  # KL(teacher || student), mean over the batch
    loss, soft = distillation_loss(s, t, hard, alpha=alpha, temperature=T)
    assert soft.item() == pytest.approx(kl * T * T, rel=1e-5)
    assert loss.item() == pytest.approx(alpha * kl * T * T + (1 - alpha) * hard.item(), rel=1e-5)
    same, zero = distillation_loss(t, t, hard, alpha=alpha, temperature=T)  # no divergence from itself
    assert zero.item() == pytest.approx(0.0, abs=1e-6) and same.item() == pytest.approx((1 - alpha) * hard.item())


def test_teacher_view_renormalises_and_resizes_like_the_teachers_own_input():
    import torch.nn.functional as F

    from tldist.data.transforms import Normalizer
    from tldist.train.distill import TeacherView

    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    ms, ss, mt, st = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (0.5, 0.5, 0.5), (0.25, 0.3, 0.2)
    student = Normalizer(ms, ss, device="cpu")(images)
    for size, mode in ((16, "bilinear"), (40, "bicubic")):
        view = TeacherView(ms, ss, mt, st, size, mode, device="cpu")
        want = F.interpolate(Normalizer(mt, st, device="cpu")(images), size=(size, size), mode=mode,
                             align_corners=False, antialias=size < 24)
        torch.testing.assert_close(view(student), want, rtol=1e-4, atol=1e-4)
    same = TeacherView(ms, ss, ms, ss, 24, device="cpu")
    assert same(student) is student  # nothing to do: the student's own batch


def test_distiller_adds_the_soft_term_and_logs_its_window_mean():
    """The Distiller runs the teacher on its own view of the batch, without autograd, and reports the
    mean soft term of the micro-batches since the last log step."""
    from tldist.train.distill import Distiller, TeacherView, distillation_loss

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval().requires_grad_(False)
    view = TeacherView((0.5,) * 3, (0.25,) * 3, (0.4,) * 3, (0.2,) * 3, 8, device="cpu")
    d = Distiller(teacher, view, alpha=0.6, temperature=2.0, order=[2, 0, 1], device="cpu", source="t")
    softs = []
    for _ in range(3):
        images, student = torch.randn(4, 3, 12, 12), torch.randn(4, 3, requires_grad=True)
        hard = torch.nn.functional.cross_entropy(student, torch.tensor([0, 1, 2, 0]))
        loss = d(student, images, hard)
        want, soft = distillation_loss(student, teacher(view(images))[:, [2, 0, 1]], hard, alpha=0.6, temperature=2.0)
        torch.testing.assert_close(loss, want)
        softs.append(soft.item())
        loss.backward()  # the student gets gradients; the teacher has none to get
        assert student.grad is not None and all(p.grad is None for p in teacher.parameters())
    assert d.log_metrics()["train/kd_loss"] == pytest.approx(sum(softs) / 3, rel=1e-6)
    assert d.log_metrics()["train/kd_loss"] == 0.0  # the window restarted


def test_teacher_classes_are_matched_by_name():
    from tldist.errors import UserError
    from tldist.train.distill import match_teacher_classes

    assert match_teacher_classes(["a", "b", "c"], ["a", "b", "c"], "t") is None
    assert match_teacher_classes(["a", "b", "c"], ["c", "a", "b"], "t") == [2, 0, 1]
    with pytest.raises(UserError, match=r"distill.teacher 'runs/t'.*teacher only \[c\], data only \[d\]"):
        match_teacher_classes(["a", "b", "c"], ["a", "b", "d"], "runs/t")
