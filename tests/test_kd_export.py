"""Getting the student out: unwrapping, saving, `load_student` without a teacher, and `lit-kd export`."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from lit_kd.cli import main
from lit_kd.export import (
    STUDENT_RECORD_KEY,
    export_checkpoint,
    load_exported,
    load_student,
    save_model,
    student_record,
    unwrap_model,
)
from lit_kd.students import BiGRUClassifier

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["good", "bad", "movie", "film", "great", "awful", "plot", "the", "a", "is"]


class Net(nn.Module):
    """A user's own model: what a saved student must load into."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.body = nn.Linear(3, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _LightningModuleWrapperBase(nn.Module):
    """Stands in for the wrapper Lightning < 2.1 put around the module under DDP (`_forward_module`)."""

    def __init__(self, forward_module: nn.Module) -> None:
        super().__init__()
        self._forward_module = forward_module


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_tokenizer(folder: Path) -> Path:
    """A WordPiece tokenizer over a 15-token vocabulary, saved in ``folder`` (nothing is downloaded)."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    if "vocab" in inspect.signature(BertTokenizerFast).parameters:  # transformers 5
        tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)})
    else:
        (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    return folder


def distillation_checkpoint(path: Path, student: nn.Module, record: bool = True, **extra) -> Path:
    """A checkpoint shaped like one of `DistillationModule` (teacher left out, as with `save_teacher=False`)."""
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    state["projections.h.0.weight"] = torch.zeros(2, 2)
    checkpoint = {"state_dict": state, "hyper_parameters": {"num_labels": 3, "save_teacher": False}, **extra}
    if record:
        checkpoint[STUDENT_RECORD_KEY] = student_record(student)
    torch.save(checkpoint, path)
    return path


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------------------------ unwrap and save
def test_unwrap_model_strips_compile_ddp_like_and_lightning_wrappers_repeatedly():
    from lightning.fabric.wrappers import _FabricModule

    net = Net()
    assert unwrap_model(net) is net
    assert unwrap_model(torch.compile(net)) is net
    assert unwrap_model(nn.DataParallel(net)) is net  # a `.module` wrapper, as DDP
    assert unwrap_model(_LightningModuleWrapperBase(net)) is net
    assert unwrap_model(_FabricModule(nn.DataParallel(torch.compile(net)), strategy=None)) is net


def test_a_submodule_named_module_is_not_taken_for_a_wrapper():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = Net()

    holder = Holder()
    assert unwrap_model(holder) is holder


@pytest.mark.parametrize(
    "wrap",
    [
        torch.compile,
        nn.DataParallel,
        _LightningModuleWrapperBase,
        lambda m: nn.DataParallel(torch.compile(m)),
    ],
    ids=["compiled", "ddp_like", "lightning", "ddp_around_compiled"],
)
def test_saved_wrapped_models_load_into_the_plain_class(tmp_path, wrap):
    net = Net()
    path = save_model(wrap(net), tmp_path / "student.pt")
    state = torch.load(path, weights_only=True)
    assert list(state) == list(Net().state_dict())  # no `_orig_mod.` / `module.` / `_forward_module.` prefix
    plain = Net()
    plain.load_state_dict(state)  # strict
    assert_same_weights(plain, net)


def test_a_compiled_submodule_is_saved_under_its_plain_name(tmp_path):
    net = Net()
    net.body = torch.compile(net.body)
    state = torch.load(save_model(net, tmp_path / "student.pt"), weights_only=True)
    assert sorted(state) == sorted(Net().state_dict())


def test_a_wrapped_transformers_model_is_saved_with_save_pretrained(tmp_path):
    bert = tiny_bert()
    out = save_model(nn.DataParallel(torch.compile(bert)), tmp_path / "student")
    assert (out / "config.json").is_file()
    assert_same_weights(BertForSequenceClassification.from_pretrained(out), bert)


# ------------------------------------------------------------------------------------------------ record and load
def test_student_record_names_the_class_and_holds_a_transformers_config():
    bert = tiny_bert()
    record = student_record(nn.DataParallel(bert))
    assert record["kind"] == "transformers"
    assert record["class"] == "transformers.models.bert.modeling_bert.BertForSequenceClassification"
    assert record["config"]["hidden_size"] == 16 and len(record["config"]["id2label"]) == 3
    assert record["config"]["model_type"] == "bert"
    assert student_record(torch.compile(Net())) == {"kind": "torch", "class": f"{__name__}.Net"}


def test_a_record_survives_a_weights_only_checkpoint(tmp_path):
    torch.save({"record": student_record(tiny_bert())}, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)["record"]
    assert loaded == student_record(tiny_bert())


def test_load_student_rebuilds_a_transformers_student_from_the_record(tmp_path):
    bert = tiny_bert(seed=1)
    ckpt = distillation_checkpoint(tmp_path / "kd.ckpt", bert)
    student = load_student(ckpt)
    assert type(student) is BertForSequenceClassification
    assert_same_weights(student, bert)
    x = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(student.eval()(input_ids=x).logits, bert(input_ids=x).logits)


def test_load_student_into_a_given_student_strips_compiled_keys(tmp_path):
    net = Net()
    compiled = torch.compile(net)
    # A student passed to DistillationModule already compiled: its keys read `student._orig_mod.*`.
    torch.save({"state_dict": {f"student.{k}": v for k, v in compiled.state_dict().items()}}, tmp_path / "kd.ckpt")
    assert any("_orig_mod" in k for k in torch.load(tmp_path / "kd.ckpt", weights_only=True)["state_dict"])
    fresh = Net()
    assert load_student(tmp_path / "kd.ckpt", torch.compile(fresh)) is fresh
    assert_same_weights(fresh, net)


def test_load_student_errors_name_the_file_and_what_to_pass(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_student(missing)
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, tmp_path / "finetune.ckpt")
    with pytest.raises(ValueError, match=r"finetune\.ckpt to hold the student's weights under `student\.`"):
        load_student(tmp_path / "finetune.ckpt", Net())
    ckpt = distillation_checkpoint(tmp_path / "old.ckpt", Net(), record=False)
    with pytest.raises(ValueError, match=r"Expected `student` .*/old\.ckpt holds no `lit_kd_student` record"):
        load_student(ckpt)
    ckpt = distillation_checkpoint(tmp_path / "torch.ckpt", Net())
    with pytest.raises(ValueError, match=rf"Expected `student` \(an instance of {__name__}\.Net.*torch\.ckpt"):
        load_student(ckpt)
    with pytest.raises(ValueError, match=r"(?s)torch\.ckpt to fit `student` \(Net\).*size mismatch"):
        load_student(ckpt, Net(width=5))
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"Lightning checkpoint that loads with `weights_only=True` but .*junk\.ckpt"):
        load_student(tmp_path / "junk.ckpt")


# ------------------------------------------------------------------------------------------------ lit-kd export
def sst2_config(tmp_path: Path, tokenizer: Path) -> Path:
    """configs/distill_sst2_minilm.yaml with every teacher checkpoint pointing to a file that does not exist."""
    config = yaml.safe_load((ROOT / "configs/distill_sst2_minilm.yaml").read_text())
    teacher, student = config["model"]["init_args"]["teacher"], config["model"]["init_args"]["student"]
    assert student["class_path"] == "lit_kd.factories.bert_student"  # the shape this test stands for
    missing = str(tmp_path / "no_such_teacher.ckpt")
    teacher["init_args"]["checkpoint"] = student["init_args"]["checkpoint"] = missing
    teacher["init_args"]["name_or_path"] = student["init_args"]["name_or_path"] = str(tmp_path / "no_such_model")
    config["data"]["init_args"]["tokenizer"] = str(tokenizer)
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_lit_kd_export_writes_a_transformers_student_without_reading_the_teacher(tmp_path, monkeypatch, capsys):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    config = sst2_config(tmp_path, tokenizer)
    bert = tiny_bert(seed=2)
    ckpt = distillation_checkpoint(tmp_path / "best.ckpt", bert)
    read = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **kw: read.append(Path(f)) or real_load(f, *a, **kw))
    out = tmp_path / "student"
    main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--out", str(out)])
    assert read == [ckpt]  # the checkpoint alone: no teacher weights, no teacher checkpoint
    assert f"student written to {out}" in capsys.readouterr().out
    exported = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(exported) is BertForSequenceClassification
    assert_same_weights(exported, bert)
    assert AutoTokenizer.from_pretrained(out)("the film is great")["input_ids"] == [2, 12, 8, 14, 9, 3]


def test_lit_kd_export_needs_no_config_for_a_transformers_student(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    bert = tiny_bert(seed=3)
    ckpt = distillation_checkpoint(
        tmp_path / "best.ckpt", bert, datamodule_hyper_parameters={"tokenizer": str(tokenizer)}
    )
    out = export_checkpoint(ckpt, tmp_path / "student")
    assert_same_weights(load_exported(out), bert)
    assert AutoTokenizer.from_pretrained(out)("a bad plot")["input_ids"][1:-1] == [13, 6, 11]


def bigru_config(tmp_path: Path, student_args: dict) -> Path:
    config = yaml.safe_load((ROOT / "configs/distill_sst2_minilm.yaml").read_text())
    config["model"]["init_args"]["teacher"]["init_args"]["checkpoint"] = str(tmp_path / "no_such_teacher.ckpt")
    config["model"]["init_args"]["student"] = {
        "class_path": "lit_kd.students.BiGRUClassifier",
        "init_args": student_args,
    }
    del config["data"]
    path = tmp_path / "bigru.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_lit_kd_export_writes_a_state_dict_and_how_to_rebuild_a_torch_student(tmp_path):
    # `num_labels` left to the data link: the export adds the run's value (3) from the checkpoint.
    args = {"vocab_size": 30, "embedding_dim": 8, "hidden_size": 4}
    torch.manual_seed(0)
    gru = BiGRUClassifier(num_labels=3, **args)
    ckpt = distillation_checkpoint(tmp_path / "best.ckpt", gru)
    out = tmp_path / "student"
    main(["export", "--config", str(bigru_config(tmp_path, args)), "--ckpt_path", str(ckpt), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["student.pt", "student.yaml"]
    spec = yaml.safe_load((out / "student.yaml").read_text())
    assert spec == {"class_path": "lit_kd.students.BiGRUClassifier", "init_args": {**args, "num_labels": 3}}
    by_hand = BiGRUClassifier(**spec["init_args"])
    by_hand.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    assert_same_weights(by_hand, gru)
    rebuilt = load_exported(out)
    assert type(rebuilt) is BiGRUClassifier
    assert_same_weights(rebuilt, gru)


def test_a_checkpoint_without_a_record_is_exported_from_the_config_with_a_warning(tmp_path):
    args = {"vocab_size": 30, "embedding_dim": 8, "hidden_size": 4, "num_labels": 3}
    gru = BiGRUClassifier(**args)
    ckpt = distillation_checkpoint(tmp_path / "old.ckpt", gru, record=False)
    with pytest.warns(UserWarning, match=r"old\.ckpt holds no `lit_kd_student` record"):
        out = export_checkpoint(ckpt, tmp_path / "student", config=bigru_config(tmp_path, args))
    assert_same_weights(load_exported(out), gru)


def test_lit_kd_export_of_a_torch_student_needs_the_config(tmp_path):
    ckpt = distillation_checkpoint(tmp_path / "best.ckpt", Net())
    with pytest.raises(ValueError, match=rf"Expected `config` .* student of .*best\.ckpt is a {__name__}\.Net"):
        main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    old = distillation_checkpoint(tmp_path / "old.ckpt", Net(), record=False)
    with pytest.raises(ValueError, match=r"Expected `config` .* since .*old\.ckpt holds no `lit_kd_student` record"):
        export_checkpoint(old, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"Expected `config` to be a YAML file .*nope\.yaml"):
        export_checkpoint(ckpt, tmp_path / "out", config=tmp_path / "nope.yaml")
    with pytest.raises(SystemExit):  # argparse: --out is required
        main(["export", "--ckpt_path", str(ckpt)])


# ------------------------------------------------------------------------------------------------ a real run
def fitted_checkpoint(tmp_path: Path) -> tuple[Path, nn.Module]:
    """Two training steps of a DistillationModule, then its checkpoint (the teacher is left out by default)."""
    from lit_kd import DistillationModule
    from tests.test_kd_module import loader, trainer

    module = DistillationModule(tiny_bert(seed=0), tiny_bert(seed=1))
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, train_dataloaders=loader(2))
    t.save_checkpoint(tmp_path / "kd.ckpt")
    return tmp_path / "kd.ckpt", module.student


def test_a_fitted_checkpoint_loads_into_a_given_student_without_a_teacher(tmp_path):
    ckpt, trained = fitted_checkpoint(tmp_path)
    assert not torch.equal(tiny_bert(seed=5).classifier.weight, trained.classifier.weight)
    assert_same_weights(load_student(ckpt, tiny_bert(seed=5)), trained)


def test_a_fitted_checkpoint_records_its_student_and_exports_without_a_config(tmp_path):
    ckpt, trained = fitted_checkpoint(tmp_path)
    assert torch.load(ckpt, weights_only=True)[STUDENT_RECORD_KEY] == student_record(trained)
    assert_same_weights(load_student(ckpt), trained)
    out = export_checkpoint(ckpt, tmp_path / "student")
    assert_same_weights(AutoModelForSequenceClassification.from_pretrained(out), trained)


def test_lit_kd_fit_then_export_of_the_sst2_recipe_reads_no_teacher(tmp_path, monkeypatch):
    """configs/distill_sst2_minilm.yaml in miniature, fitted by `lit-kd fit`; the teacher is deleted before export."""
    import shutil

    monkeypatch.chdir(tmp_path)
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    tiny_bert(seed=0, num_labels=2).save_pretrained(tmp_path / "teacher")
    (tmp_path / "sst").mkdir()
    rows = "".join(f"{WORDS[i % 10]} {WORDS[(3 * i) % 10]}\t{i % 2}\n" for i in range(8))
    for split in ("train", "dev"):
        (tmp_path / "sst" / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    config = yaml.safe_load((ROOT / "configs/distill_sst2_minilm.yaml").read_text())
    config["trainer"].update(accelerator="cpu", max_steps=2, val_check_interval=None, enable_progress_bar=False)
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    model = config["model"]["init_args"]
    for who in ("teacher", "student"):
        model[who]["init_args"].update(name_or_path=str(tmp_path / "teacher"), checkpoint=None)
    model["student"]["init_args"]["layers"] = [1]  # the tiny teacher has 2 layers
    hidden, attention = model["config"]["intermediate_matches"]
    hidden.update(layer_t=2, layer_s=1)
    attention.update(layer_t=1, layer_s=0)
    config["data"]["init_args"].update(data_dir=str(tmp_path / "sst"), tokenizer=str(tokenizer), batch_size=4)
    config["test_after_fit"] = False
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "distill.yaml")])
    ckpt = tmp_path / "run/checkpoints/best.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k.startswith("teachers.") for k in state)
    shutil.rmtree(tmp_path / "teacher")  # the teacher cannot be read any more; the config still names it
    main(["export", "--config", str(tmp_path / "distill.yaml"), "--ckpt_path", str(ckpt), "--out", "student"])
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert exported.config.num_hidden_layers == 1 and exported.config.num_labels == 2
    student_state = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
    assert exported.state_dict().keys() == student_state.keys()
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(value, student_state[key], rtol=0, atol=0, msg=key)
    assert AutoTokenizer.from_pretrained(tmp_path / "student")("a film")["input_ids"] == [2, 13, 8, 3]


def test_load_exported_names_the_folder_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_exported(tmp_path)
