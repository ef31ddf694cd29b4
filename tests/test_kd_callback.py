"""DistillationCallback: distillation added to a user's own LightningModule (tests/kd_user_project.py) by a callback.

Checked against independent computations: one SGD step equals the hand-computed step on ``user loss + w * KD``; named
module features with a projection; resume continues exactly; user losses log their own values; YAML with dotted
paths; two-process DDP keeps replicas and teacher in step.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_kd import DistillationCallback, DistillationConfig, IntermediateMatch
from tests.conftest import cpu_trainer
from tests.ddp_helpers import read_ranks, run_all, torchrun
from tests.kd_user_project import (
    TEACHER_INPUTS,
    MyModule,
    Samples,
    UserData,
    my_kd,
    my_match,
    tiny_teacher,
    two_args,
    user_adaptor,
)

TEACHER_LAYER, STUDENT_LAYER = "bert.encoder.layer.1", "encoder"


def trainer(tmp_path: Path | None, **kw) -> L.Trainer:
    return cpu_trainer(tmp_path, **{"log_every_n_steps": 1, **kw})


def match_config(**kw) -> DistillationConfig:
    match = IntermediateMatch(TEACHER_LAYER, STUDENT_LAYER, projection=("linear", 8, 16), weight=0.5, name="enc")
    return DistillationConfig(temperature=2.0, intermediate_matches=[match], **kw)


class Watch(L.Callback):
    """Counts the student's forward calls, records the teacher's mode inside its forward and each step's loss."""

    def __init__(self, module: MyModule, teacher: torch.nn.Module) -> None:
        self.student_calls = 0
        self.teacher_training: list[bool] = []
        self.losses: list[float] = []
        self.lrs: list[list[float]] = []
        module.net.register_forward_hook(lambda *_: setattr(self, "student_calls", self.student_calls + 1))
        teacher.register_forward_pre_hook(
            lambda m, *_: self.teacher_training.append(any(x.training for x in m.modules()))
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_one_sgd_step_equals_the_hand_computed_step_and_the_user_module_is_untouched(tmp_path):
    teacher, module = tiny_teacher(), MyModule(lr=1.0)
    net0 = copy.deepcopy(module.net)
    batch = Samples(4)[0:4]  # the first training batch (UserData: batch 4, file order)
    # Independent computation: the teacher in eval mode, the KD term by its formula, one SGD step with lr 1.
    with torch.no_grad():
        z_t = copy.deepcopy(teacher).eval()(input_ids=batch["ids"], attention_mask=batch["attn"]).logits
    z_s = net0(batch["ids"], batch["attn"])
    T, w_kd = 2.0, 0.7
    kd = T**2 * -(F.softmax(z_t / T, -1) * F.log_softmax(z_s / T, -1)).sum(-1).mean()
    (F.cross_entropy(z_s, batch["y"]) + w_kd * kd).backward()
    expected = {name: p - p.grad for name, p in net0.named_parameters()}

    callback = DistillationCallback(
        teacher, DistillationConfig(temperature=T, kd_loss_weight=w_kd), student_module="net",
        teacher_inputs=TEACHER_INPUTS, student_adaptor=user_adaptor,
    )  # fmt: skip
    watch = Watch(module, teacher)
    trainer(tmp_path, max_steps=1, callbacks=[callback, watch]).fit(module, UserData(n=4))
    for name, p in module.net.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6)
    assert watch.student_calls == 1 and watch.teacher_training == [False]
    assert "training_step" not in vars(module)  # the user's own training_step is back


def test_the_user_module_keeps_its_metric_scheduler_and_checkpoints(tmp_path):
    teacher, module = tiny_teacher(), MyModule(lr=0.1)
    teacher_before = copy.deepcopy(teacher.state_dict())
    callback = DistillationCallback(
        teacher, DistillationConfig(temperature=2.0), student_module="net", teacher_inputs=TEACHER_INPUTS
    )
    watch = Watch(module, teacher)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, max_epochs=2, callbacks=[callback, watch, checkpoint], enable_checkpointing=True)
    t.fit(module, UserData(n=8))  # 2 epochs of 2 steps
    assert {"user/acc", "user/loss", "train/kd", "train/temperature"} <= set(t.callback_metrics)
    assert watch.lrs == [[0.1 * 0.5], [0.1 * 0.25]]  # StepLR stepped per epoch, not per step
    assert watch.student_calls == 4 and watch.teacher_training == [False] * 4
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key  # bit-identical
    assert not any(p.requires_grad for p in teacher.parameters())
    in_optimizer = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}

    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert all(k.startswith(("net.", "train_acc.")) for k in ckpt["state_dict"]), sorted(ckpt["state_dict"])
    assert "teacher" not in str(ckpt["hyper_parameters"])
    loaded = MyModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_named_module_match_with_a_projection_trains_saves_and_resumes_exactly(tmp_path):
    def run(max_epochs: int, root: Path, ckpt_path: str | None = None, seed: int = 0):
        torch.manual_seed(seed)  # a resumed run starts from other projection weights: the checkpoint must restore them
        callback = DistillationCallback(
            tiny_teacher(), match_config(), student_module="net", teacher_inputs=TEACHER_INPUTS,
            student_adaptor=user_adaptor, projection_lr=0.05,
        )  # fmt: skip
        module = MyModule(lr=0.1, momentum=0.9)
        watch = Watch(module, callback.distiller.all_teachers()[0])
        save = ModelCheckpoint(dirpath=root, save_last=True)
        t = trainer(root, max_epochs=max_epochs, callbacks=[callback, watch, save], enable_checkpointing=True)
        projection0 = copy.deepcopy(callback.distiller.projections.state_dict())
        t.fit(module, UserData(n=8), ckpt_path=ckpt_path)
        return t, module, callback, watch, projection0

    t, module, callback, watch, projection0 = run(4, tmp_path / "a")
    assert "train/match/enc" in t.callback_metrics
    groups = t.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["params"][0] is callback.distiller.projections["enc"][0].weight
    assert groups[1]["lr"] == pytest.approx(0.05 * 0.5**4)  # the user's StepLR drives the projections' group too
    assert not torch.equal(callback.distiller.projections["enc"][0].weight, projection0["enc.0.weight"])
    ckpt = torch.load(tmp_path / "a" / "last.ckpt", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "DistillationCallback" in k]
    torch.testing.assert_close(state["projections"]["enc.0.weight"], callback.distiller.projections["enc"][0].weight)
    assert not any("teacher" in k or "projection" in k for k in ckpt["state_dict"])

    run(2, tmp_path / "b")
    t2, module2, callback2, watch2, _ = run(4, tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"), seed=7)
    assert len(watch2.losses) == 4  # epochs 3 and 4
    torch.testing.assert_close(watch2.losses, watch.losses[4:], rtol=0, atol=1e-6)
    for key, value in callback.distiller.projections.state_dict().items():
        torch.testing.assert_close(callback2.distiller.projections.state_dict()[key], value, rtol=0, atol=1e-6)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(module2.state_dict()[key], value, rtol=0, atol=1e-6)


def test_user_losses_log_their_own_values(tmp_path):
    config = DistillationConfig(
        temperature=2.0,
        kd_loss_type=my_kd,
        intermediate_matches=[
            IntermediateMatch(TEACHER_LAYER, STUDENT_LAYER, loss=my_match, projection=("linear", 8, 16))
        ],
    )
    assert config.intermediate_matches[0].name == "hidden_encoder_bert_encoder_layer_1_my_match"
    teacher, module = tiny_teacher(), MyModule(lr=1.0)
    callback = DistillationCallback(
        teacher, config, student_module="net", teacher_inputs=TEACHER_INPUTS, student_adaptor=user_adaptor
    )
    expected = _user_loss_values(teacher, module, callback)
    t = trainer(tmp_path, max_steps=1, callbacks=[callback])
    t.fit(module, UserData(n=4))
    name = config.intermediate_matches[0].name
    torch.testing.assert_close(t.callback_metrics["train/kd/my_kd"], expected["kd"])
    torch.testing.assert_close(t.callback_metrics["train/kd"], expected["kd"])
    torch.testing.assert_close(t.callback_metrics[f"train/match/{name}"], expected["match"])


def _user_loss_values(teacher, module, callback) -> dict[str, torch.Tensor]:
    """``my_kd`` and ``my_match`` on the first batch, computed directly from the models before training."""
    batch = Samples(4)[0:4]
    feats = {}
    teacher = copy.deepcopy(teacher).eval()
    teacher.bert.encoder.layer[1].register_forward_hook(lambda m, a, out: feats.setdefault("t", out))
    with torch.no_grad():
        z_t = teacher(input_ids=batch["ids"], attention_mask=batch["attn"]).logits
        net = copy.deepcopy(module.net)
        z_s = net(batch["ids"], batch["attn"])
        h_s = net.encoder(net.embed(batch["ids"]))
        projection = copy.deepcopy(callback.distiller.projections).eval()
        (name,) = list(projection)
        temperature = torch.full((4, 1), 2.0)
        return {
            "kd": my_kd(z_s, z_t, temperature, None),
            "match": my_match(projection[name](h_s), feats["t"], batch["attn"].bool()),
        }


def test_user_losses_from_yaml_by_dotted_path(tmp_path):
    from lit_kd.cli import build_cli

    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
            "default_root_dir": str(tmp_path),
            "callbacks": [{
                "class_path": "lit_kd.DistillationCallback",
                "init_args": {
                    "teacher": {"class_path": "tests.kd_user_project.tiny_teacher", "init_args": {"seed": 0}},
                    "config": {
                        "temperature": 2.0,
                        "kd_loss_type": "tests.kd_user_project.my_kd",
                        "intermediate_matches": [{
                            "layer_t": TEACHER_LAYER, "layer_s": STUDENT_LAYER, "name": "enc",
                            "loss": "tests.kd_user_project.my_match", "projection": ["linear", 8, 16],
                        }],
                    },
                    "student_module": "net",
                    "teacher_inputs": TEACHER_INPUTS,
                    "student_adaptor": "tests.kd_user_project.user_adaptor",
                },
            }],
        },
        "model": {"class_path": "tests.kd_user_project.MyModule", "init_args": {"lr": 1.0}},
        "data": {"class_path": "tests.kd_user_project.UserData", "init_args": {"n": 4}},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(path)], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, DistillationCallback)]
    assert callback.distiller.config.user_kd_loss is my_kd
    assert callback.distiller.config.intermediate_matches[0].user_loss is my_match
    expected = _user_loss_values(callback.distiller.all_teachers()[0], cli.model, callback)
    cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    torch.testing.assert_close(metrics["train/kd/my_kd"], expected["kd"])
    torch.testing.assert_close(metrics["train/match/enc"], expected["match"])


def test_bad_arguments_are_refused_at_construction():
    with pytest.raises(
        ValueError, match=r"`kd_loss_type` to be callable as fn\(logits_s, logits_t, temperature\[, mask"
    ):
        DistillationConfig(kd_loss_type=two_args)
    with pytest.raises(ValueError, match=r"`loss` to be callable as fn\(feature_s, feature_t, mask\)"):
        IntermediateMatch(1, 1, loss=two_args)
    with pytest.raises(ValueError, match=r"`kd_loss_type`='tests.kd_user_project.nothing' to name a callable"):
        DistillationConfig(kd_loss_type="tests.kd_user_project.nothing")
    with pytest.raises(ValueError, match="`hard_label_loss` to be callable as fn"):
        DistillationConfig(hard_label_loss=two_args)
    with pytest.raises(ValueError, match="hard_label_weight` to be 0 with DistillationCallback"):
        DistillationCallback(tiny_teacher(), DistillationConfig(hard_label_weight=1.0))
    callback = DistillationCallback(tiny_teacher(), match_config(), student_module="nett")
    with pytest.raises(ValueError, match="'nett' to name a submodule of the LightningModule"):
        trainer(None, max_steps=1, callbacks=[callback]).fit(MyModule(), UserData(n=4))
    callback = DistillationCallback(tiny_teacher(), DistillationConfig(), student_module="net")
    with pytest.raises(TypeError, match=r"teacher's `BertForSequenceClassification.forward\(.*the batch's keys are "):
        trainer(None, max_steps=1, callbacks=[callback]).fit(MyModule(), UserData(n=4))


@pytest.mark.ddp
def test_two_process_ddp_keeps_replicas_and_teacher_in_step(tmp_path):
    command = torchrun(
        "--standalone", "--nproc-per-node", "2", str(Path(__file__).parent / "ddp_helpers.py"), "kdcallback",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    run_all([command], cwd=tmp_path, timeout=300, log_dir=tmp_path / "logs")
    ranks = read_ranks(tmp_path / "out" / "kdcallback" / "record", 2)
    assert [record["global_step"] for record, _ in ranks] == [4, 4]  # 2 epochs of 16 samples / (2 x batch 4)
    for key, value in ranks[0][1].items():
        assert torch.equal(value, ranks[1][1][key]), key  # the user's module: identical replicas
    extras = [torch.load(tmp_path / "out" / "kdcallback" / f"rank{r}_distiller.pt") for r in range(2)]
    teacher = tiny_teacher().state_dict()
    for extra in extras:
        for key, value in teacher.items():
            assert torch.equal(extra["teacher"][key], value), key  # bit-identical
    for key, value in extras[0]["projections"].items():
        assert torch.equal(value, extras[1]["projections"][key]), key  # gradients averaged over the processes
    assert not torch.equal(extras[0]["projections"]["enc.0.weight"], extras[0]["projections0"]["enc.0.weight"])
    assert ranks[0][0]["losses"] != ranks[1][0]["losses"]  # each process saw its own shard


class CallsItself(MyModule):
    """A user module whose training_step calls ``self(batch)``: the LightningModule itself is the student."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch), batch["y"])


def test_the_lightning_module_itself_as_the_student_and_bf16_true_precision(tmp_path):
    teacher, module = tiny_teacher(), CallsItself(lr=1.0)
    net0 = copy.deepcopy(module.net)
    callback = DistillationCallback(teacher, DistillationConfig(temperature=2.0), teacher_inputs=TEACHER_INPUTS)
    trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(module, UserData(n=4))
    batch = Samples(4)[0:4]
    with torch.no_grad():
        z_t = copy.deepcopy(teacher).eval()(input_ids=batch["ids"], attention_mask=batch["attn"]).logits
    z_s = net0(batch["ids"], batch["attn"])
    kd = 4.0 * -(F.softmax(z_t / 2, -1) * F.log_softmax(z_s / 2, -1)).sum(-1).mean()
    (F.cross_entropy(z_s, batch["y"]) + kd).backward()
    for name, p in module.net.named_parameters():
        torch.testing.assert_close(p, dict(net0.named_parameters())[name] - dict(net0.named_parameters())[name].grad)

    teacher = tiny_teacher()
    callback = DistillationCallback(teacher, match_config(), student_module="net", teacher_inputs=TEACHER_INPUTS)
    t = trainer(tmp_path, max_steps=1, callbacks=[callback], precision="bf16-true")
    t.fit(MyModule(lr=0.1), UserData(n=4))
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}  # moved with the module to its precision
    assert callback.distiller.projections["enc"][0].weight.dtype == torch.bfloat16
    assert torch.isfinite(t.callback_metrics["train/match/enc"])
