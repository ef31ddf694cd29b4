"""Temperature and weight schedules through real fits: ``flsw``/``cwsm`` in ``DistillationModule`` (one and two
teachers, masked token logits and unmasked sequence logits) and in ``DistillationCallback``, from YAML with
``lit-kd fit``, and loss weights that follow the training progress step by step.

Each first-step loss is checked against an independent computation (the temperature formulas written out here).
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lit_kd import DistillationCallback, DistillationConfig, DistillationModule, ModelView
from lit_kd.cli import main
from tests.conftest import cpu_trainer
from tests.kd_user_project import TEACHER_INPUTS, MyModule, Samples, UserData, tiny_teacher, user_adaptor

VOCAB, LEN, LABELS = 20, 5, 4
T, BETA, GAMMA = 2.0, 0.3, 2.0


class TinyTagger(nn.Module):
    """Embeddings and a linear head: (B, L) ids -> (B, L, C) token logits, or (B, C) mean-pooled when ``pool``."""

    def __init__(self, width: int = 8, num_labels: int = LABELS, pool: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.num_labels, self.pool = num_labels, pool
        self.embed = nn.Embedding(VOCAB, width)
        self.head = nn.Linear(width, num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        logits = self.head(torch.tanh(self.embed(input_ids)) * 3)  # (B, L, C)
        if self.pool:
            m = attention_mask.unsqueeze(-1).to(logits.dtype)
            logits = (logits * m).sum(1) / m.sum(1)  # (B, C)
        return {"logits": logits}


def tagger_adaptor(batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> ModelView:
    """Token logits scored where ``attention_mask`` is 1; pooled logits unmasked."""
    logits = outputs["logits"]
    mask = batch["attention_mask"].bool() if logits.dim() == 3 else None
    return ModelView(logits=logits, logits_mask=mask, labels=batch["labels"])


def token_batches(n: int, size: int = 4, seed: int = 0, pooled: bool = False) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(size, LEN, dtype=torch.long)
        mask[0, 3:] = 0
        mask[2, 2:] = 0
        ids = torch.randint(1, VOCAB, (size, LEN), generator=g) * mask
        labels = torch.randint(0, LABELS, (size,) if pooled else (size, LEN), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


class RandomTokens(L.LightningDataModule):
    """Training batches of :func:`token_batches`, for the YAML run."""

    def __init__(self, n: int = 3, pooled: bool = False) -> None:
        super().__init__()
        self.n, self.pooled = n, pooled

    def train_dataloader(self) -> DataLoader:
        return DataLoader(token_batches(self.n, pooled=self.pooled), batch_size=None)


def reference_temperatures(z_s: Tensor, z_t: Tensor, scheduler: str) -> Tensor:
    """The schedules of arXiv:1911.07471 written out: ``T + beta * (mean(w) - w)`` over the valid items (N, C)."""
    if scheduler == "flsw":
        cos = (z_s * z_t).sum(-1) / (z_s.norm(dim=-1) * z_t.norm(dim=-1))
        w = (1 - cos) ** GAMMA
    else:
        w = 1 / (z_s.softmax(-1).max(-1).values + 1e-3)
    return T + BETA * (w.mean() - w)


def reference_kd(z_s: Tensor, z_t: Tensor, scheduler: str) -> Tensor:
    """``mean_n T_n**2 * CE(softmax(z_t / T_n), softmax(z_s / T_n))`` over the valid items (N, C)."""
    t = reference_temperatures(z_s, z_t, scheduler)[:, None]  # (N, 1)
    ce = -(F.softmax(z_t / t, -1) * F.log_softmax(z_s / t, -1)).sum(-1)
    return (t.squeeze(-1) ** 2 * ce).mean()


class Record(L.Callback):
    """Each training step's loss and logged values."""

    def __init__(self, *keys: str) -> None:
        self.keys, self.losses, self.logged = keys, [], {k: [] for k in keys}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        for key in self.keys:
            self.logged[key].append(float(trainer.callback_metrics[key]))


def fit(module: L.LightningModule, data, tmp_path: Path, callbacks: list, **kw) -> L.Trainer:
    trainer = cpu_trainer(tmp_path, callbacks=callbacks, **kw)
    trainer.fit(module, data)
    return trainer


def schedule_config(scheduler: str, **kw) -> DistillationConfig:
    return DistillationConfig(
        temperature=T, temperature_scheduler=scheduler, flsw_beta=BETA, flsw_gamma=GAMMA, cwsm_beta=BETA, **kw
    )


# ------------------------------------------------------------------------------------------ flsw / cwsm end to end
@pytest.mark.parametrize("scheduler", ["flsw", "cwsm"])
@pytest.mark.parametrize("teachers", [1, 2])
@pytest.mark.parametrize("shape", ["tokens_masked", "sequence"])
def test_dynamic_temperatures_through_distillation_module(tmp_path, scheduler, teachers, shape):
    pooled = shape == "sequence"
    teacher = [TinyTagger(16, pool=pooled, seed=s) for s in range(teachers)]
    student = TinyTagger(8, pool=pooled, seed=10)
    batches = token_batches(3, pooled=pooled)
    b = batches[0]
    with torch.no_grad():  # independent reference of the first step: the mean of the teachers' logits
        z_t = torch.stack([t(b["input_ids"], b["attention_mask"])["logits"] for t in teacher]).mean(0)
        z_s = copy.deepcopy(student)(b["input_ids"], b["attention_mask"])["logits"]
        if not pooled:
            z_t, z_s = z_t[b["attention_mask"].bool()], z_s[b["attention_mask"].bool()]  # (N, C) valid tokens
        expected = reference_kd(z_s, z_t, scheduler)
    module = DistillationModule(
        teacher if teachers > 1 else teacher[0],
        student,
        schedule_config(scheduler),
        teacher_adaptor=tagger_adaptor,
        student_adaptor=tagger_adaptor,
        optimizer=torch.optim.SGD,
    )
    record = Record("train/temperature", "train/kd")
    fit(module, DataLoader(batches, batch_size=None), tmp_path, [record], max_steps=3)
    assert record.losses[0] == pytest.approx(float(expected), rel=1e-5)
    assert len(record.logged["train/temperature"]) == 3 and all(t > 0 for t in record.logged["train/temperature"])
    # the mean temperature over the valid items stays at the base temperature (no item is floored here)
    assert record.logged["train/temperature"] == pytest.approx([T] * 3, rel=1e-5)
    assert record.losses[1] != record.losses[0]  # the student trained


@pytest.mark.parametrize("scheduler", ["flsw", "cwsm"])
def test_dynamic_temperatures_through_the_callback(tmp_path, scheduler):
    teacher, module = tiny_teacher(), MyModule(lr=1.0)
    net0 = copy.deepcopy(module.net)
    batch = Samples(8)[0:4]  # UserData's first batch
    with torch.no_grad():
        z_t = copy.deepcopy(teacher).eval()(input_ids=batch["ids"], attention_mask=batch["attn"]).logits
        z_s = net0(batch["ids"], batch["attn"])
        expected = F.cross_entropy(z_s, batch["y"]) + 0.5 * reference_kd(z_s, z_t, scheduler)
    callback = DistillationCallback(
        teacher,
        schedule_config(scheduler, kd_loss_weight=0.5),
        student_module="net",
        teacher_inputs=TEACHER_INPUTS,
        student_adaptor=user_adaptor,
    )
    record = Record("train/temperature")
    fit(module, UserData(n=8), tmp_path, [callback, record], max_steps=2)
    assert record.losses[0] == pytest.approx(float(expected), rel=1e-5)
    assert len(record.logged["train/temperature"]) == 2


@pytest.mark.parametrize("scheduler", ["flsw", "cwsm"])
def test_dynamic_temperatures_from_yaml_with_lit_kd_fit(tmp_path, scheduler):
    tagger = "tests.test_kd_schedules_fit.TinyTagger"
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 3, "log_every_n_steps": 1, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": "run", "version": 0}},
        },
        "model": {
            "class_path": "lit_kd.DistillationModule",
            "init_args": {
                "teacher": {"class_path": tagger, "init_args": {"width": 16, "seed": 1}},
                "student": {"class_path": tagger, "init_args": {"width": 8, "seed": 2}},
                "teacher_adaptor": "tests.test_kd_schedules_fit.tagger_adaptor",
                "student_adaptor": "tests.test_kd_schedules_fit.tagger_adaptor",
                "config": {"temperature": T, "temperature_scheduler": scheduler, "flsw_beta": BETA,
                           "cwsm_beta": BETA, "flsw_eps": 1.0e-4},
                "num_labels": LABELS,
            },
        },
        "data": {"class_path": "tests.test_kd_schedules_fit.RandomTokens", "init_args": {"n": 3}},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    with open(tmp_path / "run" / "version_0" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/temperature")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]  # the per-step mean temperature, every step
    assert [float(r["train/temperature"]) for r in rows] == pytest.approx([T] * 3, rel=1e-5)
    assert all(float(r["train/kd"]) > 0 for r in rows)


# ----------------------------------------------------------------------------------- weights along the progress
@pytest.mark.parametrize(
    ("mode", "kd", "hard"),
    [
        ("multiply", [2.0, 1.5, 1.0, 0.5], [0.0, 0.25, 0.5, 0.75]),
        ("textbrewer", [2.0, 0.75, 0.5, 0.25], [1.0, 0.25, 0.5, 0.75]),  # configured at step 0, then schedule(p)
    ],
)
def test_loss_weights_follow_the_schedule_step_by_step_in_a_fit(tmp_path, mode, kd, hard):
    config = schedule_config(
        "constant",
        kd_loss_weight=2.0,
        kd_loss_weight_scheduler="linear_decay",
        hard_label_weight=1.0,
        hard_label_weight_scheduler="linear_growth",
        weight_schedule_mode=mode,
    )
    module = DistillationModule(
        TinyTagger(16), TinyTagger(8, seed=1), config, teacher_adaptor=tagger_adaptor, student_adaptor=tagger_adaptor
    )
    record = Record("train/kd_weight", "train/hard_weight", "train/kd", "train/hard")
    fit(module, DataLoader(token_batches(4), batch_size=None), tmp_path, [record], max_steps=4)
    assert record.logged["train/kd_weight"] == pytest.approx(kd)
    assert record.logged["train/hard_weight"] == pytest.approx(hard)
    for i, loss in enumerate(record.losses):  # the total is the weighted sum with this step's weights
        expected = kd[i] * record.logged["train/kd"][i] + hard[i] * record.logged["train/hard"][i]
        assert loss == pytest.approx(expected, rel=1e-5)


def test_progress_counts_optimizer_steps_under_gradient_accumulation(tmp_path):
    config = schedule_config("constant", kd_loss_weight=2.0, kd_loss_weight_scheduler="linear_decay")
    module = DistillationModule(
        TinyTagger(16), TinyTagger(8, seed=1), config, teacher_adaptor=tagger_adaptor, student_adaptor=tagger_adaptor
    )
    record = Record("train/kd_weight")
    batches = DataLoader(token_batches(4), batch_size=None)
    fit(module, batches, tmp_path, [record], max_steps=2, accumulate_grad_batches=2)
    assert record.logged["train/kd_weight"] == pytest.approx([2.0, 2.0, 1.0, 1.0])  # p = 0, 0, 1/2, 1/2


def test_a_weight_that_starts_at_zero_does_not_stop_the_first_step(tmp_path):
    """``kd_loss_weight_scheduler: linear_growth`` alone: the only term weighs 0 at step 0; training goes on."""
    config = schedule_config("flsw", kd_loss_weight_scheduler="linear_growth")
    module = DistillationModule(
        TinyTagger(16), TinyTagger(8, seed=1), config, teacher_adaptor=tagger_adaptor, student_adaptor=tagger_adaptor
    )
    record = Record("train/kd_weight", "train/kd")
    fit(module, DataLoader(token_batches(3), batch_size=None), tmp_path, [record], max_steps=3)
    assert record.logged["train/kd_weight"] == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert record.losses[0] == 0.0 and record.logged["train/kd"][0] > 0  # computed and logged, weighted by 0
    assert record.losses[1] == pytest.approx(record.logged["train/kd"][1] / 3, rel=1e-5)


def test_staged_distillation_matches_first_then_predictions(tmp_path):
    """TinyBERT's two stages in one config: the match alone before ``stage_boundary``, the KD term alone after."""
    from lit_kd import IntermediateMatch
    from tests.test_kd_module import bert, loader

    match = IntermediateMatch(4, 2, projection=("linear", 8, 16), weight=0.5, weight_scheduler="first_stage", name="h")
    config = DistillationConfig(
        temperature=2.0, kd_loss_weight_scheduler="second_stage", stage_boundary=0.5, intermediate_matches=[match]
    )
    module = DistillationModule(bert(4, 16, 0), bert(2, 8, 1), config, num_labels=3)
    record = Record("train/kd", "train/match/h", "train/kd_weight")
    fit(module, loader(4), tmp_path, [record], max_steps=4)
    assert record.logged["train/kd_weight"] == [0.0, 0.0, 1.0, 1.0]  # p = 0, 1/4 | 1/2, 3/4
    for i, loss in enumerate(record.losses):
        expected = 0.5 * record.logged["train/match/h"][i] if i < 2 else record.logged["train/kd"][i]
        assert loss == pytest.approx(expected, rel=1e-5)
    assert config.match_weight_at(match, 0.49) == 0.5 and config.match_weight_at(match, 0.5) == 0.0
    with pytest.raises(ValueError, match=r"`stage_boundary` to be in \(0, 1\)"):
        DistillationConfig(stage_boundary=1.0)
    with pytest.raises(ValueError, match="`weight_scheduler` to be one of"):
        IntermediateMatch(1, 1, weight_scheduler="second")
