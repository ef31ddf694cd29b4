"""Safe loading: weights-only checkpoints, no remote code, trusted class paths only, clear errors, atomic writes."""

from __future__ import annotations

import ast
import functools
import json
import pathlib
import re
import sys
import uuid
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn

import lit_kd.export
import lit_kt.module
from lit_kd.export import (
    STUDENT_RECORD_KEY,
    allow_model_modules,
    export_checkpoint,
    load_exported,
    load_student,
    save_model,
    student_record,
)
from lit_kd.factories import pretrained_classifier
from lit_kd.students import BiGRUClassifier, load_teacher
from lit_kt import SAKT, KTModule, model_from_checkpoint
from lit_kt.module import allow_model_modules as allow_kt_modules
from tests.test_kd_export import Net, assert_same_weights, distillation_checkpoint, tiny_bert, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_allow_lists(monkeypatch):
    """Each test starts from the default trusted modules (no modules allowed by code or by the environment)."""
    monkeypatch.setattr(lit_kd.export, "_allowed_modules", [])
    monkeypatch.setattr(lit_kt.module, "_allowed_modules", [])
    monkeypatch.delenv("LIT_KD_ALLOWED_MODULES", raising=False)
    monkeypatch.delenv("LIT_KT_ALLOWED_MODULES", raising=False)


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """A uniquely named module on ``sys.path`` whose import creates ``MARKER``: (its name, the marker's path)."""
    name = f"untrusted_{uuid.uuid4().hex[:10]}"
    marker = tmp_path / "MARKER"
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / f"{name}.py").write_text(
        "import pathlib\n"
        "from torch import nn\n"
        f"pathlib.Path({str(marker)!r}).touch()\n\n\n"
        "class Student(nn.Module):\n"
        "    def __init__(self, width: int = 3) -> None:\n"
        "        super().__init__()\n"
        "        self.width = width\n"
        "        self.lin = nn.Linear(2, width)\n\n"
        "    @property\n"
        "    def config(self) -> dict:\n"
        "        return {'width': self.width}\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    yield name, marker
    sys.modules.pop(name, None)


# ------------------------------------------------------------------------------------------------ weights_only
def _calls(path: Path, attr: str) -> list[ast.Call]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == attr]


def _weights_only(call: ast.Call) -> object:
    return next(
        (k.value.value for k in call.keywords if k.arg == "weights_only" and isinstance(k.value, ast.Constant)), None
    )


def test_every_torch_load_in_the_packages_and_scripts_passes_weights_only_true():
    files = [p for folder in ("lit_kd", "lit_kt", "scripts") for p in sorted((ROOT / folder).rglob("*.py"))]
    loads = {
        f"{path.relative_to(ROOT)}:{call.lineno}": _weights_only(call)
        for path in files
        for call in _calls(path, "load")
        if isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
    }
    assert len(loads) >= 3  # lit_kd/_files.py, lit_kt/factories.py, scripts/bench_kt.py at least
    assert {where: value for where, value in loads.items() if value is not True} == {}


def test_our_lightning_loads_pass_weights_only_true_and_torch_defaults_to_it():
    for rel in ("lit_kt/factories.py", "scripts/bench_kt.py"):
        calls = _calls(ROOT / rel, "load_from_checkpoint") + [
            c for c in _calls(ROOT / rel, "test") if any(k.arg == "ckpt_path" for k in c.keywords)
        ]
        assert calls, rel
        assert all(_weights_only(c) is True for c in calls), rel
    requirement = next(line.strip() for line in (ROOT / "setup.cfg").read_text().splitlines() if "torch>=" in line)
    assert requirement == "torch>=2.6,<2.14"  # torch 2.6 made weights_only=True the default of torch.load


def _touching_payload(marker: Path) -> object:
    """An object whose unpickling creates ``marker`` (a pickled callable, as an attacker would ship)."""

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (pathlib.Path(marker),)

    return Payload()


def test_a_pickled_callable_would_run_but_is_refused_naming_the_file(tmp_path):
    live = tmp_path / "live.ckpt"
    torch.save({"state_dict": {}, "x": _touching_payload(tmp_path / "RAN")}, live)
    torch.load(live, weights_only=False)  # the payload is live: an unsafe load runs it
    assert (tmp_path / "RAN").exists()

    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": _touching_payload(marker)}, ckpt)
    message = r"(?s)evil\.ckpt holds pickled objects other than tensors and plain containers.*refused"
    with pytest.raises(ValueError, match=message):
        load_student(ckpt)
    with pytest.raises(ValueError, match=message):
        model_from_checkpoint(str(ckpt))
    with pytest.raises(Exception, match="Weights only load failed"):  # Lightning's own load, torch's default
        KTModule.load_from_checkpoint(ckpt)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ bad files
def _bad_checkpoint(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.ckpt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        torch.save({"state_dict": {"student.w": torch.ones(1000)}}, tmp_path / "whole.ckpt")
        data = (tmp_path / "whole.ckpt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "text":
        path.write_text("epoch: 3\nthis is not a checkpoint\n")
    elif case == "other_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "a zip of something else")
    elif case == "no_state_dict":
        torch.save({"epoch": 3, "weights": {"w": torch.ones(2)}}, path)
    elif case == "not_a_dict":
        torch.save([torch.ones(2)], path)
    elif case == "pickled_callable":
        torch.save({"state_dict": {}, "x": functools.partial(print)}, path)
    return path


BAD = {
    "empty": r"is empty \(0 bytes\)",
    "truncated": r"is not a readable torch file \(truncated, or another kind of file\)",
    "text": r"is not a readable torch file \(truncated, or another kind of file\)",
    "other_zip": r"is not a readable torch file \(truncated, or another kind of file\)",
    "no_state_dict": r"Lightning checkpoint \(a dict with a `state_dict`\) but .* holds keys \['epoch', 'weights'\]",
    "not_a_dict": r"Lightning checkpoint \(a dict with a `state_dict`\) but .* holds list",
    "pickled_callable": r"holds pickled objects other than tensors .*functools\.partial",
}


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    tiny_bert().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_get_an_error_naming_the_file_and_what_was_expected(tmp_path, case, bert_folder):
    path = _bad_checkpoint(tmp_path, case)
    loaders = {
        "load_student": lambda: load_student(path),
        "export_checkpoint": lambda: export_checkpoint(path, tmp_path / "out"),
        "pretrained_classifier": lambda: pretrained_classifier(str(bert_folder), 3, checkpoint=str(path)),
        "model_from_checkpoint": lambda: model_from_checkpoint(str(path)),
    }
    for name, load in loaders.items():
        with pytest.raises(ValueError, match=BAD[case]) as info:
            load()
        assert str(path) in str(info.value), name
        assert "Expected `" in str(info.value), name
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ remote code
@pytest.fixture
def remote_code_folder(tmp_path):
    """A model folder whose config.json and tokenizer_config.json point (`auto_map`) at code that creates MARKER."""
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(tmp_path / 'MARKER')!r}).touch()\n")
    auto = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModel": "evil.Evil",
        "AutoModelForSequenceClassification": "evil.Evil",
    }
    config = {"model_type": "evil_remote", "architectures": ["Evil"], "auto_map": auto}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return folder


def test_transformers_folders_with_their_own_code_are_refused_without_running_it(tmp_path, remote_code_folder):
    from lit_kd.factories import bigru_student

    def no_prompt(*args):
        raise AssertionError("asked whether to run remote code")

    with pytest.MonkeyPatch.context() as m:
        m.setattr("builtins.input", no_prompt)
        for load in (
            lambda: load_teacher(str(remote_code_folder)),
            lambda: load_exported(remote_code_folder),
            lambda: bigru_student(str(remote_code_folder), num_labels=2),
        ):
            with pytest.raises(ValueError, match="trust_remote_code=True"):
                load()
    assert not (tmp_path / "MARKER").exists()


# ------------------------------------------------------------------------------------------------ lit_kt class paths
def kt_checkpoint(path: Path, class_path: str, init_args: dict | None = None, state: dict | None = None) -> Path:
    """A lit-kt checkpoint whose model spec names ``class_path`` (written without importing it)."""
    hyper_parameters = {"compile": False, "compile_backend": "inductor", "flush_denormal": True}
    hyper_parameters["model"] = {"class_path": class_path, "init_args": init_args or {}}
    checkpoint = {"state_dict": state or {}, "hyper_parameters": hyper_parameters}
    torch.save({**checkpoint, "pytorch-lightning_version": L.__version__}, path)
    return path


def test_a_real_kt_checkpoint_still_loads(tmp_path):
    module = KTModule(SAKT(20, d_model=8, num_heads=2, max_len=5))
    state = module.state_dict()
    ckpt = kt_checkpoint(tmp_path / "kt.ckpt", "lit_kt.models.sakt.SAKT", dict(module.model.config), state)
    assert_same_weights(model_from_checkpoint(str(ckpt)), module.model)
    assert_same_weights(KTModule.load_from_checkpoint(ckpt, weights_only=True).model, module.model)


def test_an_untrusted_kt_class_path_is_refused_before_import(tmp_path, marker_module):
    name, marker = marker_module
    for class_path in (f"{name}.Student", "os.system", "builtins.eval", "lit_kt_lookalike.SAKT"):
        ckpt = kt_checkpoint(tmp_path / "kt.ckpt", class_path)
        with pytest.raises(ValueError, match=rf"Refusing to import the model class '{class_path}' of the checkpoint "):
            model_from_checkpoint(str(ckpt))
        with pytest.raises(ValueError, match=rf"(?s)Refusing to import the model class '{class_path}'.*allow_model"):
            KTModule.load_from_checkpoint(ckpt, weights_only=True)
        with pytest.raises(ValueError, match=re.escape(str(ckpt))):
            model_from_checkpoint(str(ckpt))
    assert not marker.exists() and name not in sys.modules


def test_a_kt_class_path_that_is_no_module_class_is_refused(tmp_path):
    for class_path, kind in (("torch.nn.functional.relu", "function"), ("lit_kt.data.KTDataModule", "type")):
        ckpt = kt_checkpoint(tmp_path / "kt.ckpt", class_path)
        with pytest.raises(TypeError, match=rf"kt\.ckpt to name an nn.Module subclass but got '{class_path}' \({kind}"):
            model_from_checkpoint(str(ckpt))
        with pytest.raises(TypeError, match="nn.Module subclass"):
            KTModule.load_from_checkpoint(ckpt, weights_only=True)
    with pytest.raises(ValueError, match=r"holds None"):
        model_from_checkpoint(str(distillation_checkpoint(tmp_path / "kd.ckpt", Net())))


@pytest.mark.parametrize("how", ["function", "environment"])
def test_allowed_kt_modules_load_the_users_model(tmp_path, marker_module, monkeypatch, how):
    name, marker = marker_module
    state = {"model.lin.weight": torch.randn(4, 2), "model.lin.bias": torch.randn(4)}
    ckpt = kt_checkpoint(tmp_path / "kt.ckpt", f"{name}.Student", {"width": 4}, state)
    if how == "function":
        assert allow_kt_modules(f"{name}.") == ("lit_kt", "torch.nn", name)
    else:
        monkeypatch.setenv("LIT_KT_ALLOWED_MODULES", f"other.pkg, {name}")
        assert allow_kt_modules() == ("lit_kt", "torch.nn", "other.pkg", name)
    model = model_from_checkpoint(str(ckpt))
    assert marker.exists() and type(model).__module__ == name
    torch.testing.assert_close(model.lin.weight, state["model.lin.weight"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Expected `modules` to be dotted module names .* got 'not a module'"):
        allow_kt_modules("not a module")


# ------------------------------------------------------------------------------------------------ lit_kd class paths
def test_an_untrusted_student_record_is_refused_before_import(tmp_path, marker_module):
    name, marker = marker_module
    for class_path in (f"{name}.Student", "os.system", "builtins.eval", "lit_kd_lookalike.X"):
        ckpt = distillation_checkpoint(tmp_path / "kd.ckpt", Net(), record=False)
        checkpoint = torch.load(ckpt, weights_only=True)
        checkpoint[STUDENT_RECORD_KEY] = {"kind": "transformers", "class": class_path, "config": {}}
        torch.save(checkpoint, ckpt)
        pattern = rf"Refusing to import .{class_path}. named in the `lit_kd_student` record of the checkpoint .*kd.ckpt"
        with pytest.raises(ValueError, match=pattern):
            load_student(ckpt)
        with pytest.raises(ValueError, match=pattern):
            export_checkpoint(ckpt, tmp_path / "out")
    assert not marker.exists() and name not in sys.modules
    assert not (tmp_path / "out").exists()


def test_a_student_record_that_is_no_transformers_class_is_refused(tmp_path):
    cases = {
        "torch.nn.functional.relu": (TypeError, r"to be an nn.Module subclass but got function"),
        "lit_kd.data.TextClassificationDataModule": (TypeError, r"to be an nn.Module subclass but got type"),
        "torch.nn.Linear": (TypeError, r"to name a `transformers` model class"),
    }
    for class_path, (error, message) in cases.items():
        ckpt = distillation_checkpoint(tmp_path / "kd.ckpt", Net(), record=False)
        checkpoint = torch.load(ckpt, weights_only=True)
        checkpoint[STUDENT_RECORD_KEY] = {"kind": "transformers", "class": class_path, "config": {}}
        torch.save(checkpoint, ckpt)
        with pytest.raises(error, match=message):
            load_student(ckpt)


def exported_folder(folder: Path, spec: dict, state: dict) -> Path:
    folder.mkdir()
    (folder / "student.yaml").write_text(yaml.safe_dump(spec))
    torch.save(state, folder / "student.pt")
    return folder


def test_load_exported_refuses_untrusted_class_paths_even_nested(tmp_path, marker_module):
    name, marker = marker_module
    top = exported_folder(tmp_path / "top", {"class_path": f"{name}.Student", "init_args": {}}, {})
    with pytest.raises(ValueError, match=rf"Refusing to import '{name}\.Student' named in the `class_path` of .*top"):
        load_exported(top)
    nested_spec = {"class_path": "torch.nn.Sequential", "init_args": {"x": [{"class_path": f"{name}.Student"}]}}
    nested = exported_folder(tmp_path / "nested", nested_spec, {})
    with pytest.raises(ValueError, match=rf"Refusing to import '{name}\.Student' named in a nested `class_path`"):
        load_exported(nested)
    function = exported_folder(tmp_path / "function", {"class_path": "torch.nn.functional.relu"}, {})
    with pytest.raises(TypeError, match=r"nn.Module subclass or a function annotated to return one"):
        load_exported(function)
    assert not marker.exists() and name not in sys.modules


def test_load_exported_rebuilds_trusted_classes_and_factories(tmp_path, marker_module):
    name, marker = marker_module
    state = {"lin.weight": torch.randn(5, 2), "lin.bias": torch.randn(5)}
    folder = exported_folder(tmp_path / "mine", {"class_path": f"{name}.Student", "init_args": {"width": 5}}, state)
    allow_model_modules(name)
    student = load_exported(folder)
    assert marker.exists() and type(student).__module__ == name
    torch.testing.assert_close(student.lin.weight, state["lin.weight"], rtol=0, atol=0)

    tokenizer = tiny_tokenizer(tmp_path / "tok")
    args = {"tokenizer": str(tokenizer), "num_labels": 2, "embedding_dim": 4, "hidden_size": 4}
    gru = BiGRUClassifier(vocab_size=15, num_labels=2, embedding_dim=4, hidden_size=4, pad_token_id=0)
    factory = {"class_path": "lit_kd.factories.bigru_student", "init_args": args}
    assert_same_weights(load_exported(exported_folder(tmp_path / "gru", factory, gru.state_dict())), gru)

    bad = exported_folder(tmp_path / "bad", {"class_path": "lit_kd.students.BiGRUClassifier"}, {})
    (bad / "student.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"student\.pt is empty \(0 bytes\)"):
        load_exported(bad)


def test_lit_kd_export_checks_the_configs_student_and_allowing_it_round_trips(tmp_path, marker_module, monkeypatch):
    name, marker = marker_module
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"student": {"class_path": f"{name}.Student"}}}}))
    torch.manual_seed(0)
    state = {"student.lin.weight": torch.randn(3, 2), "student.lin.bias": torch.randn(3)}
    ckpt = tmp_path / "kd.ckpt"
    record = {"kind": "torch", "class": f"{name}.Student"}
    torch.save({"state_dict": state, "hyper_parameters": {"num_labels": 2}, STUDENT_RECORD_KEY: record}, ckpt)
    with pytest.raises(ValueError, match=rf"Refusing to import '{name}\.Student' named in `model.init_args.student`"):
        export_checkpoint(ckpt, tmp_path / "out", config=config)
    assert not marker.exists() and not (tmp_path / "out").exists()
    monkeypatch.setenv("LIT_KD_ALLOWED_MODULES", name)
    student = load_exported(export_checkpoint(ckpt, tmp_path / "out", config=config))
    torch.testing.assert_close(student.lin.weight, state["student.lin.weight"], rtol=0, atol=0)


def test_a_transformers_record_still_loads_and_exports(tmp_path):
    bert = tiny_bert(seed=4)
    ckpt = distillation_checkpoint(tmp_path / "kd.ckpt", bert)
    assert_same_weights(load_student(ckpt), bert)
    assert_same_weights(load_exported(export_checkpoint(ckpt, tmp_path / "student")), bert)
    assert student_record(bert)["class"].startswith("transformers.")


# ------------------------------------------------------------------------------------------------ atomic writes
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_save_model_writes_the_file_atomically(tmp_path, monkeypatch):
    path, net = tmp_path / "student.pt", Net()
    save_model(net, path)
    assert_same_weights(_load_net(path), net)
    reference = tmp_path / "plain"
    reference.write_bytes(b"")
    assert path.stat().st_mode == reference.stat().st_mode  # the umask decides, as for open(path, "w")
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(Net(width=7), path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def _load_net(path: Path) -> nn.Module:
    net = Net()
    net.load_state_dict(torch.load(path, weights_only=True))
    return net


def test_save_pretrained_goes_through_a_temporary_folder(tmp_path):
    bert = tiny_bert(seed=6)
    save_model(bert, tmp_path / "new")
    assert (tmp_path / "new" / "config.json").is_file() and _leftovers(tmp_path) == []
    assert_same_weights(load_exported(tmp_path / "new"), bert)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "README.md").write_text("kept")
    save_model(bert, existing)  # each file replaced on its own; other files of the folder stay
    assert (existing / "README.md").read_text() == "kept" and (existing / "config.json").is_file()
    assert _leftovers(tmp_path) == [] and _leftovers(existing) == []


def test_a_failed_export_leaves_no_partial_folder(tmp_path):
    bert = tiny_bert(seed=7)
    missing = tmp_path / "no_such_tokenizer"
    ckpt = distillation_checkpoint(tmp_path / "kd.ckpt", bert, datamodule_hyper_parameters={"tokenizer": str(missing)})
    with pytest.raises(OSError):
        export_checkpoint(ckpt, tmp_path / "student")
    assert not (tmp_path / "student").exists()
    assert _leftovers(tmp_path) == []
