"""tldist.evaluate at scale: per-class counts in O(classes), the confusion matrix only below
``eval.confusion_max_classes``, balanced accuracy, and the eval-set protocols of ``data.val_sets`` entries
(``restrict_classes``: ImageNet-R/-A; ``class_map``: ImageNet-V2), checked against hand computations on
real shards scored by a real model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_image
from tldist.config import EvalConfig, ValSet, load_config
from tldist.errors import ConfigError, DataError
from tldist.evaluate import EvalAccumulator, eval_set_loader, score
from tldist.world import World


def random_eval(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that are right ~60% of the time (so mistakes cluster), labels and a padding mask."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    right = torch.rand(n, generator=g) < 0.6
    logits[right, labels[right]] += 4.0
    confuse = torch.rand(n, generator=g) < 0.5  # half of the others go to the next class
    logits[~right & confuse, (labels[~right & confuse] + 1) % classes] += 6.0
    mask = torch.rand(n, generator=g) > 0.05
    return logits, labels, mask


def test_counts_match_dense_reference_and_sklearn():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    classes = 37
    logits, labels, mask = random_eval(900, classes)
    acc = EvalAccumulator(classes)
    for i in range(0, 900, 64):
        acc.update(logits[i:i + 64], labels[i:i + 64], mask[i:i + 64])
    r = acc.compute()
    lg, lb = logits[mask], labels[mask]
    pred = lg.argmax(1)
    assert r["count"] == int(mask.sum())
    assert r["top1"] == pytest.approx(100 * float((pred == lb).double().mean()), abs=1e-9)
    top5 = (lg.topk(5, 1).indices == lb[:, None]).any(1)
    assert r["top5"] == pytest.approx(100 * float(top5.double().mean()), abs=1e-9)
    assert r["balanced_acc"] == pytest.approx(100 * balanced_accuracy_score(lb.numpy(), pred.numpy()), abs=1e-9)
    assert r["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(lg, lb)), rel=1e-5)
    dense = confusion_matrix(lb.numpy(), pred.numpy(), labels=list(range(classes)))
    assert r["confusion"] == dense.tolist()
    assert r["per_class_count"] == dense.sum(1).tolist()
    off = [(int(dense[t, p]), t, p) for t in range(classes) for p in range(classes) if t != p and dense[t, p]]
    expected = [[t, p, n] for n, t, p in sorted(off, key=lambda x: (-x[0], x[1], x[2]))[:20]]
    assert r["top_confused"] == expected


def test_above_the_threshold_no_matrix_and_nothing_quadratic(monkeypatch):
    """Above eval.confusion_max_classes only the top pairs are reported, and no tensor of the accumulator ever
    holds classes^2 elements (the mistake pairs are folded into unique (pair, count) form as they come)."""
    classes = 300
    logits, labels, _ = random_eval(2000, classes, seed=1)
    monkeypatch.setattr(EvalAccumulator, "_COMPACT_EVERY", 256)  # fold often: the result must not change
    small = EvalAccumulator(classes, confusion_max_classes=299, top_confused=5)
    full = EvalAccumulator(classes)  # below the (default 1000) threshold: the dense reference
    biggest = 0
    for i in range(0, 2000, 100):
        small.update(logits[i:i + 100], labels[i:i + 100])
        full.update(logits[i:i + 100], labels[i:i + 100])
        biggest = max(biggest, *(t.numel() for t in vars(small).values() if isinstance(t, torch.Tensor)))
    a, b = small.compute(), full.compute()
    assert a["confusion"] is None and b["confusion"] is not None
    assert biggest <= 3 * classes < classes * classes
    dense = np.array(b["confusion"])
    np.fill_diagonal(dense, 0)
    assert a["top_confused"] == b["top_confused"][:5]
    assert a["top_confused"][0][2] == dense.max()
    assert {k: a[k] for k in ("top1", "top5", "balanced_acc", "count")} == \
        {k: b[k] for k in ("top1", "top5", "balanced_acc", "count")}
    assert small.compute()["top_confused"] == a["top_confused"]  # compute() leaves the counts as they were


def test_balanced_accuracy_ignores_absent_classes_and_weights_classes_equally():
    acc = EvalAccumulator(4)
    # class 0: 9 of 9 right; class 1: 0 of 1; classes 2, 3 absent
    logits = torch.zeros(10, 4)
    logits[:, 0] = 5.0
    acc.update(logits, torch.tensor([0] * 9 + [1]))
    r = acc.compute()
    assert r["top1"] == pytest.approx(90.0)
    assert r["balanced_acc"] == pytest.approx(50.0)  # (1.0 + 0.0) / 2: absent classes are not zeros
    assert math.isnan(r["per_class_acc"][2])


# ---- eval sets scored like ImageNet-R/-A (restricted) and ImageNet-V2 (class map) -----------------------
MODEL_CLASSES = [f"n{i:04d}" for i in range(1000)]


class PixelLinear(torch.nn.Module):
    """A fixed linear classifier on the raw pixels: 16 x 16 x 3 -> 1000 logits (seeded)."""

    def __init__(self, outputs: int = 1000):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 16 * 16, outputs)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g) * 0.05)
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1))


def write_set(out: Path, class_names: list[str], labels: list[int], seed: int = 0) -> None:
    from tldist.data.sources import Sample
    from tldist.data.writer import write_shards

    rng = np.random.default_rng(seed)
    samples = [Sample(key=f"k{i:05d}", data=tiny_image(label, rng), ext="png", label=label)
               for i, label in enumerate(labels)]
    write_shards(samples, out, "val", class_names, max_count=150, max_size=None, check="none")


def loader_for(location: Path, classes: list[str], entry=None):
    from tldist.config import DataConfig

    cfg = DataConfig(batch_size=32, eval_batch_size=32, num_workers=0, pin_memory=False)
    return eval_set_loader(cfg, World(), str(location), classes, image_size=16, interpolation="bilinear",
                           crop_pct=1.0, entry=entry)


def collect(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Every real sample's logits and label, in loader order (the hand computation's input)."""
    from tldist.data.transforms import Normalizer

    norm = Normalizer([0.5] * 3, [0.25] * 3, device="cpu")
    outs, labels = [], []
    with torch.no_grad():
        for batch in loader:
            m = batch["mask"]
            outs.append(model(norm(batch["image"]))[m])
            labels.append(batch["label"][m])
    return torch.cat(outs), torch.cat(labels)


def test_200_class_subset_restricted_to_its_classes_matches_hand_computation(tmp_path):
    """An ImageNet-R-like set: 200 of the model's 1,000 classes (named by the model's names, in another order),
    scored with the logits restricted to those 200 (timm's --valid-labels: slice the outputs, then argmax)."""
    from tldist.data.transforms import Normalizer

    rng = np.random.default_rng(3)
    subset = sorted(rng.choice(1000, 200, replace=False).tolist(), reverse=True)  # set order != model order
    names = [MODEL_CLASSES[i] for i in subset]
    labels = [i % 200 for i in range(400)]
    write_set(tmp_path / "r", names, labels)
    model = PixelLinear().eval()
    norm = Normalizer([0.5] * 3, [0.25] * 3, device="cpu")

    loader, restrict = loader_for(tmp_path / "r", MODEL_CLASSES, ValSet(str(tmp_path / "r"), restrict_classes=True))
    assert restrict == sorted(subset)
    seen = []
    got = score(model, loader, normalize=norm, num_classes=1000, device="cpu", restrict=restrict,
                on_batch=lambda b, logits: seen.append(logits[b["mask"]].argmax(1)))
    assert set(torch.cat(seen).tolist()) <= set(subset)  # no prediction outside the set's classes

    # by hand: all 1000 logits, keep the subset's columns, argmax among them, map back
    logits, truth = collect(model, loader_for(tmp_path / "r", MODEL_CLASSES)[0])
    assert sorted(set(truth.tolist())) == sorted(subset)  # labels are model indices
    cols = torch.tensor(sorted(subset))
    sub = logits[:, cols]
    pred = cols[sub.argmax(1)]
    right = pred == truth
    assert got["count"] == 400
    assert got["top1"] == pytest.approx(100 * right.double().mean().item(), abs=1e-9)
    top5 = (cols[sub.topk(5, 1).indices] == truth[:, None]).any(1)
    assert got["top5"] == pytest.approx(100 * top5.double().mean().item(), abs=1e-9)
    per_class = [right[truth == c].double().mean().item() for c in sorted(subset)]
    assert got["balanced_acc"] == pytest.approx(100 * sum(per_class) / 200, abs=1e-9)
    position = {c: j for j, c in enumerate(cols.tolist())}
    target = torch.tensor([position[t] for t in truth.tolist()])
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(sub, target).item(), rel=1e-5)
    assert sum(1 for a in got["per_class_acc"] if a == a) == 200  # the 800 classes absent from the set: NaN
    # unrestricted, the same samples score differently: the restriction is what the numbers above measured
    free = score(model, loader_for(tmp_path / "r", MODEL_CLASSES)[0], normalize=norm, num_classes=1000, device="cpu")
    assert free["loss"] > got["loss"]


def test_class_map_scores_an_index_named_set_like_the_named_one(tmp_path):
    """ImageNet-V2: folders named by class index. With a timm-style class map (line i = the set class of
    output i) the set scores exactly as the same images written with the model's class names."""
    classes = MODEL_CLASSES[:10]
    labels = [i % 10 for i in range(60)]
    index_names = [str(i) for i in range(10)]
    write_set(tmp_path / "v2", sorted(index_names), [sorted(index_names).index(str(label)) for label in labels])
    write_set(tmp_path / "named", classes, labels)
    (tmp_path / "map.txt").write_text("\n".join(index_names) + "\n")
    model = PixelLinear(10).eval()
    from tldist.data.transforms import Normalizer

    norm = Normalizer([0.5] * 3, [0.25] * 3, device="cpu")
    mapped, _ = loader_for(tmp_path / "v2", classes, ValSet(str(tmp_path / "v2"), class_map=str(tmp_path / "map.txt")))
    a = score(model, mapped, normalize=norm, num_classes=10, device="cpu")
    b = score(model, loader_for(tmp_path / "named", classes)[0], normalize=norm, num_classes=10, device="cpu")
    assert {k: a[k] for k in ("top1", "top5", "balanced_acc", "count", "confusion")} == \
        {k: b[k] for k in ("top1", "top5", "balanced_acc", "count", "confusion")}
    # a JSON map by name does the same
    (tmp_path / "map.json").write_text(__import__("json").dumps({str(i): c for i, c in enumerate(classes)}))
    mapped, _ = loader_for(tmp_path / "v2", classes, ValSet(str(tmp_path / "v2"), class_map=str(tmp_path / "map.json")))
    assert score(model, mapped, normalize=norm, num_classes=10, device="cpu")["confusion"] == b["confusion"]
    # a set class the map lacks, a map naming no model class: one line each, naming the entry
    (tmp_path / "short.json").write_text('{"0": "n0000"}')
    with pytest.raises(DataError, match=r"data.val_sets.*no entry for set class"):
        loader_for(tmp_path / "v2", classes, ValSet(str(tmp_path / "v2"), class_map=str(tmp_path / "short.json")))
    (tmp_path / "bad.json").write_text('{"0": "cat"}')
    with pytest.raises(ConfigError, match=r"'data.val_sets.class_map'.*'cat'"):
        loader_for(tmp_path / "v2", classes, ValSet(str(tmp_path / "v2"), class_map=str(tmp_path / "bad.json")))


@pytest.mark.parametrize("override, key", [
    ("eval.confusion_max_classes=-1", "eval.confusion_max_classes"),
    ("eval.top_confused=-2", "eval.top_confused"),
    ("tracker.log_model=sometimes", "tracker.log_model"),
    ("data.val_sets=[{path: a, restrict: true}]", "data.val_sets[0]"),
    ("data.val_sets=[a,{restrict_classes: true}]", "data.val_sets[1].path"),
    ("data.val_sets=[{path: a, restrict_classes: maybe}]", "data.val_sets[0].restrict_classes"),
    ("data.val_sets=[{path: a, class_map: /nonexistent/map.txt}]", "data.val_sets[0].class_map"),
])
def test_bad_eval_options_are_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override]).validate()
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)


def test_eval_config_defaults():
    cfg = load_config(None, ["tracker.log_model=true", "data.val_sets=[a,{path: b, restrict_classes: true}]"])
    assert cfg.validate().eval == EvalConfig(confusion_max_classes=1000, top_confused=20)
    assert cfg.tracker.log_model == "true"  # YAML's boolean true, as the documented string
