"""DistillationModule with several tasks: CombinedLoader batches, per-task teachers, adaptors, metrics and loaders."""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader

from lit_kd import DistillationCallback, DistillationConfig, DistillationModule
from lit_kd.adaptors import ModelView
from lit_kd.distiller import Distiller, split_tasks
from tests.test_kd_module import trainer

D, SIZE = 6, 8
LABELS = {"a": 3, "b": 5}


class MLP(nn.Module):
    def __init__(self, num_labels: int, seed: int, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D, width), nn.Tanh(), nn.Linear(width, num_labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwoHeadStudent(nn.Module):
    """A shared trunk and one head per task; returns every head's logits."""

    def __init__(self, seed: int = 7) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(D, 8), nn.Tanh())
        self.heads = nn.ModuleDict({task: nn.Linear(8, n) for task, n in LABELS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {task: head(h) for task, head in self.heads.items()}


def head_adaptor(batch: dict, outputs: dict, task: str) -> ModelView:
    return ModelView(logits=outputs[task], labels=batch["labels"])


STUDENT_ADAPTOR = {task: partial(head_adaptor, task=task) for task in LABELS}


def teachers() -> dict[str, MLP]:
    out = {"a": MLP(3, seed=0), "b": MLP(5, seed=1)}
    for teacher in out.values():  # confident teachers: their soft targets are far from the untrained student's
        with torch.no_grad():
            teacher.net[-1].weight.mul_(4.0)
            teacher.net[-1].bias.mul_(4.0)
    return out


def task_batches(teacher: nn.Module, n: int, seed: int, noise: float = 0.3) -> list[dict]:
    """Batches whose labels are the teacher's argmax, a fraction ``noise`` of them replaced by random classes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(SIZE, D, generator=g)
        with torch.no_grad():
            logits = teacher(x)
        labels = logits.argmax(-1)
        flip = torch.rand(SIZE, generator=g) < noise
        labels[flip] = torch.randint(0, logits.shape[-1], (int(flip.sum()),), generator=g)
        out.append({"x": x, "labels": labels})
    return out


def loader(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False)


def module(tmp_teachers: dict | None = None, **kw) -> DistillationModule:
    kw.setdefault("config", DistillationConfig(temperature=2.0, hard_label_weight=0.5))
    kw.setdefault("optimizer", partial(torch.optim.SGD, lr=1.0))
    return DistillationModule(
        tmp_teachers or teachers(), TwoHeadStudent(), student_adaptor=STUDENT_ADAPTOR, num_labels=LABELS, **kw
    )


def accuracy(student: nn.Module, task: str, batches: list[dict]) -> float:
    with torch.no_grad():
        right = sum(int((student(b["x"])[task].argmax(-1) == b["labels"]).sum()) for b in batches)
    return right / sum(len(b["labels"]) for b in batches)


def kl_to_teacher(student: nn.Module, teacher: nn.Module, task: str, batches: list[dict], t: float = 2.0) -> float:
    """Mean ``KL(softmax(z_t / T) || softmax(z_s / T))`` over the batches' samples."""
    with torch.no_grad():
        x = torch.cat([b["x"] for b in batches])
        log_ps, log_pt = F.log_softmax(student(x)[task] / t, -1), F.log_softmax(teacher(x) / t, -1)
    return float((log_pt.exp() * (log_pt - log_ps)).sum(-1).mean())


def expected_loss(student: nn.Module, teacher: nn.Module, task: str, batch: dict, t: float = 2.0, w_hard=0.5):
    """One task's loss computed by hand: ``T**2 * soft CE + w_hard * CE(labels)``; returns (kd, hard, loss)."""
    with torch.no_grad():
        zs, zt = student(batch["x"])[task], teacher(batch["x"])
    kd = t * t * -(F.softmax(zt / t, -1) * F.log_softmax(zs / t, -1)).sum(-1).mean()
    hard = F.cross_entropy(zs, batch["labels"])
    return kd, hard, kd + w_hard * hard


class FirstStep(L.Callback):
    """Copies the logged metrics after the first training step."""

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.logged = {k: float(v) for k, v in trainer.callback_metrics.items()}


# ---------------------------------------------------------------------- training


def test_combined_loader_batch_sums_each_tasks_loss_with_its_own_teacher(tmp_path):
    ts = teachers()
    m = module(ts)
    student0 = copy.deepcopy(m.student)
    data = {task: task_batches(ts[task], 3, seed=i) for i, task in enumerate(LABELS)}
    watch = FirstStep()
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[watch])
    t.fit(m, CombinedLoader({task: loader(b) for task, b in data.items()}, mode="max_size_cycle"))
    logged = watch.logged
    total = 0.0
    for task in LABELS:
        kd, hard, loss = expected_loss(student0, ts[task], task, data[task][0])
        assert logged[f"train/{task}/kd"] == pytest.approx(float(kd), rel=1e-5)
        assert logged[f"train/{task}/hard"] == pytest.approx(float(hard), rel=1e-5)
        assert logged[f"train/{task}/loss"] == pytest.approx(float(loss), rel=1e-5)
        assert logged[f"train/{task}/temperature"] == pytest.approx(2.0)
        total += float(loss)
    assert logged["train/loss"] == pytest.approx(total, rel=1e-5)
    assert logged["train/kd"] == pytest.approx(logged["train/a/kd"] + logged["train/b/kd"], rel=1e-6)
    assert logged["train/hard_weight"] == 0.5 and logged["train/temperature"] == pytest.approx(2.0)


def test_one_tasks_batch_tagged_or_not_and_max_size_gaps():
    ts = teachers()
    m = module(ts).eval()
    a = task_batches(ts["a"], 1, seed=0)[0]
    b = task_batches(ts["b"], 1, seed=1)[0]
    only_b = expected_loss(m.student, ts["b"], "b", b)[2]
    torch.testing.assert_close(m.training_step({**b, "task": "b"}, 0).detach(), only_b)
    torch.testing.assert_close(m.training_step({**b, "task": ["b"] * SIZE}, 0).detach(), only_b)  # collated tags
    # `CombinedLoader(mode="max_size")` gives None for an exhausted loader: that task is skipped.
    torch.testing.assert_close(m.training_step({"a": None, "b": b}, 0).detach(), only_b)
    both = m.training_step({"a": a, "b": b}, 0).detach()
    torch.testing.assert_close(both, expected_loss(m.student, ts["a"], "a", a)[2] + only_b)
    with pytest.raises(ValueError, match=r"`batch\['task'\]` to be 'a' \(the task of its loader\) but got 'b'"):
        m.training_step({"a": {**a, "task": "b"}}, 0)
    with pytest.raises(ValueError, match="one of \\['a', 'b'\\] but got 'default' \\(the batch has no `task` entry"):
        m.training_step(a, 0)


def test_a_dict_of_tensors_is_not_a_dict_of_tasks():
    assert split_tasks({"x": torch.zeros(2), "labels": torch.zeros(2)}, ["a", "b"]) is None
    assert split_tasks({"a": {"x": 1}, "labels": torch.zeros(2)}, ["a", "b"]) is None  # one key is no task
    assert split_tasks({"a": {"x": 1}, "b": None}, ["a", "b"]) == {"a": {"x": 1}}
    # Tasks named like batch entries still decide by the keys: all of them must be task names.
    d = Distiller({"x": MLP(3, 0), "y": MLP(3, 1)})
    assert [task for task, _ in d.task_batches({"x": torch.zeros(2, D), "task": "y"})] == ["y"]
    assert [task for task, _ in d.task_batches({"x": {"x": torch.zeros(2, D)}, "y": {"x": torch.zeros(2, D)}})] == [
        "x",
        "y",
    ]


def test_callback_refuses_a_batch_of_several_tasks():
    callback = DistillationCallback(teachers())
    with pytest.raises(ValueError, match="batch of several tasks \\['a', 'b'\\].*needs one task per batch"):
        callback.distiller.task({"a": {"x": torch.zeros(1, D)}, "b": {"x": torch.zeros(1, D)}})


def test_each_tasks_first_batch_has_its_views_checked():
    ts = {"a": MLP(3, 0), "b": MLP(4, 1)}  # task b's teacher has 4 classes, the student's head 5
    m = module(ts).eval()
    a, b = task_batches(ts["a"], 1, seed=0)[0], task_batches(ts["b"], 1, seed=1)[0]
    m.training_step({"a": a}, 0)
    with pytest.raises(ValueError, match=r"same shape but got \(8, 4\) \(teacher 0\) and \(8, 5\) \(student\)"):
        m.training_step({"b": b}, 0)


# ---------------------------------------------------------------------- metrics and loaders


def fit_two_tasks(tmp_path, val_loaders, **kw):
    ts = teachers()
    m = module(ts, **kw)
    train = {task: task_batches(ts[task], n, seed=i) for i, (task, n) in enumerate((("a", 6), ("b", 4)))}
    val = {task: task_batches(ts[task], 3, seed=10 + i) for i, task in enumerate(LABELS)}
    before = {task: kl_to_teacher(m.student, ts[task], task, val[task]) for task in LABELS}
    t = trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0)
    train_loader = CombinedLoader({task: loader(b) for task, b in train.items()}, mode="max_size_cycle")
    t.fit(m, train_loader, val_loaders(val))
    return t, m, ts, val, before


def test_two_tasks_with_3_and_5_labels_train_validate_and_log_per_task_metrics(tmp_path):
    # "sequential": one loader after the other, `dataloader_idx` counting the keys in their (unsorted) order.
    t, m, ts, val, before = fit_two_tasks(
        tmp_path, lambda val: CombinedLoader({"b": loader(val["b"]), "a": loader(val["a"])}, mode="sequential")
    )
    logged = t.callback_metrics
    assert {"val/a/acc", "val/b/acc", "train/a/kd", "train/b/kd", "train/kd", "train/loss"} <= set(logged)
    assert "val/acc" not in logged and not any("dataloader_idx" in k for k in logged)
    for task in LABELS:  # the student learnt both tasks from their own teachers
        assert kl_to_teacher(m.student, ts[task], task, val[task]) < 0.5 * before[task], task
    m.eval()
    for task in LABELS:  # the last validation ran on the final student: its accuracy recomputed by hand
        assert float(logged[f"val/{task}/acc"]) == pytest.approx(accuracy(m.student, task, val[task]), abs=1e-6)
    # Tests by a plain dict of loaders (keys are the tasks), and per-task metric states that do not mix.
    results = t.test(m, {task: loader(b) for task, b in val.items()}, verbose=False)
    merged = {k: v for r in results for k, v in r.items()}
    for task in LABELS:
        assert merged[f"test/{task}/acc"] == pytest.approx(accuracy(m.student, task, val[task]), abs=1e-6)
    # The per-task class counts survive a checkpoint round trip (teachers and adaptors are given again).
    t.save_checkpoint(tmp_path / "two_tasks.ckpt")
    loaded = DistillationModule.load_from_checkpoint(
        tmp_path / "two_tasks.ckpt", teacher=teachers(), student=TwoHeadStudent(), student_adaptor=STUDENT_ADAPTOR
    )
    assert loaded.hparams.num_labels == LABELS
    assert [loaded.test_metrics[task]["acc"].num_classes for task in LABELS] == [3, 5]
    torch.testing.assert_close(loaded.student.state_dict(), m.student.state_dict())


def test_a_list_of_validation_loaders_with_eval_tasks_or_tags(tmp_path):
    ts = teachers()
    val = {task: task_batches(ts[task], 2, seed=10 + i) for i, task in enumerate(LABELS)}
    loaders = [loader(val["b"]), loader(val["a"])]
    m = module(ts, eval_tasks=["b", "a"])
    results = trainer(tmp_path).validate(m, loaders, verbose=False)
    merged = {k: v for r in results for k, v in r.items()}
    for task in LABELS:
        assert merged[f"val/{task}/acc"] == pytest.approx(accuracy(m.student, task, val[task]), abs=1e-6)
    # A non-sequential CombinedLoader gives `{task: batch}`; "max_size" leaves None once a loader is exhausted.
    shorter = {"a": val["a"], "b": val["b"][:1]}
    other = module(ts)
    combined = CombinedLoader({k: loader(v) for k, v in shorter.items()}, mode="max_size")
    results = trainer(tmp_path).validate(other, combined, verbose=False)
    for task in LABELS:
        assert results[0][f"val/{task}/acc"] == pytest.approx(accuracy(other.student, task, shorter[task]), abs=1e-6)
    tagged = [loader([{**x, "task": task} for x in val[task]]) for task in ("b", "a")]
    results = trainer(tmp_path).validate(module(ts), tagged, verbose=False)
    assert {k for r in results for k in r} == {"val/a/acc", "val/b/acc"}
    with pytest.raises(ValueError, match="Expected to know the task of val loader 0 \\(one of \\['a', 'b'\\]\\)"):
        trainer(tmp_path).validate(module(ts), loaders, verbose=False)
    with pytest.raises(ValueError, match="`batch\\['task'\\]` to be 'b' \\(the task of val loader 0\\) but got 'a'"):
        trainer(tmp_path).validate(module(ts, eval_tasks=["b", "a"]), tagged[::-1], verbose=False)


def test_per_task_metric_kinds_and_argument_errors():
    m = DistillationModule(
        teachers(), TwoHeadStudent(), metric_task={"a": "multiclass", "b": "binary"}, num_labels={"a": 3}
    )
    assert set(m.val_metrics["a"]) == {"val/a/acc"} and set(m.val_metrics["b"]) == {"val/b/auc", "val/b/acc"}
    assert m.val_metrics["a"]["acc"].num_classes == 3
    m = DistillationModule(None, TwoHeadStudent(), num_labels=LABELS)  # inference: the tasks come from the dict
    assert [m.val_metrics[t]["acc"].num_classes for t in LABELS] == [3, 5]
    with pytest.raises(ValueError, match="`num_labels` to give the classes of task 'b'"):
        DistillationModule(teachers(), TwoHeadStudent(), num_labels={"a": 3})
    with pytest.raises(
        ValueError, match="`num_labels` to name only the teachers' tasks \\['a', 'b'\\] but got \\['c'\\]"
    ):
        DistillationModule(teachers(), TwoHeadStudent(), num_labels={"a": 3, "b": 5, "c": 2})
    with pytest.raises(ValueError, match="tasks \\['default'\\] but got \\['a', 'b'\\] too; give `teacher` as a dict"):
        DistillationModule(MLP(3, 0), TwoHeadStudent(), num_labels=LABELS)
    with pytest.raises(ValueError, match="`metric_task\\['b'\\]` to be 'multiclass' or 'binary' but got 'regression'"):
        DistillationModule(
            teachers(), TwoHeadStudent(), num_labels=3, metric_task={"a": "multiclass", "b": "regression"}
        )
    with pytest.raises(ValueError, match="`eval_tasks` to name tasks among \\['a', 'b'\\] but got \\['c'\\]"):
        DistillationModule(teachers(), TwoHeadStudent(), num_labels=LABELS, eval_tasks=["a", "c"])
