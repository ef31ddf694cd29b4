"""Getting the student out: unwrap it, save it alone, and load it from a checkpoint without any teacher.

- :func:`unwrap_model` strips ``torch.compile``, DDP/FSDP/DataParallel and Lightning/Fabric wrappers, so that what
  is saved loads into the user's own class.
- :func:`save_model` writes a model alone: ``save_pretrained`` for ``transformers`` models, a state dict otherwise.
- :func:`student_record` is what a ``DistillationModule`` checkpoint stores under ``"lit_kd_student"`` to rebuild its
  student without the config that built it (for ``transformers`` students: the class and the configuration).
- :func:`load_student` reads the ``student.*`` weights of a ``DistillationModule`` checkpoint into a student, or into
  one rebuilt from the record; no teacher is built and no teacher checkpoint is read.
- :func:`export_checkpoint` is ``lit-kd export``: a checkpoint to a folder that holds the student alone (plus the
  tokenizer of the run's data); :func:`load_exported` reads such a folder back.

Example:
    >>> student = load_student("runs/distill_sst2_minilm/checkpoints/best.ckpt")  # doctest: +SKIP
    >>> student = load_student("runs/distill/checkpoints/best.ckpt", MyStudent(...))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from lit_kd.adaptors import is_transformers_model

__all__ = [
    "STUDENT_RECORD_KEY",
    "export_checkpoint",
    "load_exported",
    "load_student",
    "save_model",
    "student_record",
    "unwrap_model",
]

STUDENT_RECORD_KEY = "lit_kd_student"
"""The checkpoint entry that holds :func:`student_record` of a ``DistillationModule``'s student."""

STUDENT_WEIGHTS = "student.pt"
STUDENT_SPEC = "student.yaml"

# Wrappers whose wrapped module is `.module` (torch DDP/DataParallel/FSDP1, DeepSpeed) or `._forward_module`
# (Lightning Fabric, and Lightning < 2.1 strategies); matched by class name so that nothing optional is imported.
_MODULE_WRAPPERS = frozenset({"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"})
_FORWARD_MODULE_WRAPPERS = frozenset(
    {"_FabricModule", "_LightningModuleWrapperBase", "_LightningPrecisionModuleWrapperBase"}
)
_COMPILED_SEGMENT = re.compile(r"(^|\.)_orig_mod\.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's own module inside any wrappers, unwrapped repeatedly (e.g. DDP around ``torch.compile``).

    Strips ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``), DDP, ``DataParallel``, FSDP and DeepSpeed
    engines (``module``), and Lightning's wrappers (``_forward_module``). ``nn.Module.compile`` works in place and
    leaves nothing to strip.

    Args:
        model: A module, wrapped or not.

    Returns:
        The innermost module (``model`` itself when it is not wrapped).

    Example:
        >>> net = nn.Linear(2, 3)
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    while True:
        names = {cls.__name__ for cls in type(model).__mro__}
        if "OptimizedModule" in names and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif names & _MODULE_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif names & _FORWARD_MODULE_WRAPPERS and isinstance(getattr(model, "_forward_module", None), nn.Module):
            model = model._forward_module
        else:
            return model


def _clean_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with ``torch.compile``'s ``_orig_mod.`` segments removed from its keys (compiled submodules)."""
    return {_COMPILED_SEGMENT.sub(r"\1", key): value for key, value in state.items()}


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Writes a model alone, unwrapped: ``save_pretrained`` for ``transformers`` models, else a state dict file.

    The model is unwrapped first (:func:`unwrap_model`) and the state dict's keys carry no wrapper prefix
    (``_orig_mod.``, ``module.``), so the file loads into the user's own class with ``load_state_dict``.

    Args:
        model: The model, possibly compiled or wrapped (DDP, Lightning).
        path: A folder for ``transformers`` models; a file (e.g. ``student.pt``) otherwise.

    Returns:
        The path written.
    """
    path = Path(path)
    model = unwrap_model(model)
    if is_transformers_model(model):
        model.save_pretrained(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_clean_state_dict(model.state_dict()), path)
    return path


def _class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def student_record(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the student without any teacher (stored under ``"lit_kd_student"``).

    Args:
        model: The student, possibly compiled or wrapped.

    Returns:
        ``{"kind": "transformers", "class": "<module>.<qualname>", "config": {...}}`` for a ``transformers``
        ``PreTrainedModel`` (its full configuration as JSON values, so that the checkpoint still loads with
        ``torch.load(..., weights_only=True)``), else ``{"kind": "torch", "class": "<module>.<qualname>"}``.

    Example:
        >>> student_record(nn.Linear(2, 3))
        {'kind': 'torch', 'class': 'torch.nn.modules.linear.Linear'}
    """
    model = unwrap_model(model)
    if is_transformers_model(model):
        config = json.loads(model.config.to_json_string(use_diff=False))
        return {"kind": "transformers", "class": _class_name(model), "config": config}
    return {"kind": "torch", "class": _class_name(model)}


def _import(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    obj = importlib.import_module(module)
    for part in name.split("."):  # a qualname of a nested class, e.g. "Outer.Inner"
        obj = getattr(obj, part)
    return obj


def _model_from_record(record: Mapping[str, Any], path: Path) -> nn.Module:
    """A freshly initialised ``transformers`` model of the record's class and configuration, in eval mode."""
    from transformers import AutoConfig

    try:
        cls = _import(record["class"])
    except (ImportError, AttributeError) as e:
        raise ImportError(
            f"Expected the student class {record['class']!r} named in {path} to be importable but it is not: {e}"
        ) from e
    config_class = getattr(cls, "config_class", None)
    if config_class is not None:
        config = config_class.from_dict(record["config"])
    else:
        config = AutoConfig.for_model(**record["config"])
    return cls._from_config(config).eval()


def _read_checkpoint(path: str | os.PathLike, arg: str = "checkpoint_path") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Expected `{arg}` to be a checkpoint file but got {str(path)!r}: no such file.")
    try:
        # mmap: tensors are read when used, so a checkpoint that also holds teachers (`save_teacher=True`) does not
        # bring their weights into memory.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise ValueError(
            f"Expected `{arg}` to be a Lightning checkpoint that loads with `weights_only=True` but {path} "
            f"does not: {e}"
        ) from e
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        got = f"keys {sorted(checkpoint)[:5]}" if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(
            f"Expected `{arg}` to be a Lightning checkpoint (a dict with a `state_dict`) but {path} holds {got}."
        )
    return checkpoint


def _student_state(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Tensor]:
    state = checkpoint["state_dict"]
    student = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
    if not student:
        raise ValueError(
            f"Expected the checkpoint {os.fspath(path)} to hold the student's weights under `student.` (a "
            f"DistillationModule checkpoint) but got keys like {sorted(state)[:3]}."
        )
    return _clean_state_dict(student)


def load_student(checkpoint_path: str | os.PathLike, student: nn.Module | None = None) -> nn.Module:
    """The student of a ``DistillationModule`` checkpoint, without building or reading any teacher.

    Args:
        checkpoint_path: A checkpoint written by a ``DistillationModule`` (e.g. by ``lit-kd fit``).
        student: The student to load the ``student.*`` weights into, built as in training (wrappers are stripped).
            ``None`` to rebuild a ``transformers`` student from the checkpoint's ``"lit_kd_student"`` record.

    Returns:
        The student holding the checkpoint's weights: ``student`` unwrapped (its device and mode unchanged), or the
        rebuilt model (on the CPU, in eval mode, as ``from_pretrained`` gives it).

    Raises:
        FileNotFoundError: If ``checkpoint_path`` is not a file.
        ValueError: If the checkpoint holds no ``student.*`` weights, if ``student`` is ``None`` and the checkpoint
            has no ``transformers`` record, or if the weights do not fit the student.
    """
    path = Path(checkpoint_path)
    return _load_student(_read_checkpoint(path), path, student)


def _load_student(checkpoint: Mapping[str, Any], path: Path, student: nn.Module | None) -> nn.Module:
    state = _student_state(checkpoint, path)
    if student is None:
        record = checkpoint.get(STUDENT_RECORD_KEY)
        if record is None:
            raise ValueError(
                f"Expected `student` (the student model, built as in training) since the checkpoint {path} holds no "
                f"`{STUDENT_RECORD_KEY}` record to rebuild it from, but got None; call "
                "`load_student(path, MyStudent(...))`, or `lit-kd export --config RUN.yaml` to rebuild it from the "
                "run's config."
            )
        if record.get("kind") != "transformers":
            raise ValueError(
                f"Expected `student` (an instance of {record.get('class')}, built as in training) since the "
                f"checkpoint {path} can rebuild only `transformers` students, but got None; call "
                "`load_student(path, MyStudent(...))`."
            )
        student = _model_from_record(record, path)
    else:
        student = unwrap_model(student)
    try:
        student.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"Expected the student weights of {path} to fit `student` ({type(student).__name__}) but they do not: {e}"
        ) from e
    return student


def _read_config(config: str | os.PathLike) -> dict[str, Any]:
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"Expected `config` to be a YAML file but got {str(path)!r}: no such file.")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, Mapping):
        raise ValueError(f"Expected the config {path} to hold a mapping but got {type(data).__name__}.")
    return dict(data)


def _init_args(entry: Any) -> Mapping[str, Any]:
    args = entry.get("init_args") if isinstance(entry, Mapping) else None
    return args if isinstance(args, Mapping) else {}


def _student_spec(config: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The ``class_path``/``init_args`` of ``model.init_args.student`` in a ``lit-kd`` config."""
    spec = _init_args(config.get("model")).get("student")
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(
            f"Expected the config {os.fspath(path)} to give `model.init_args.student` as a `class_path` (with "
            f"`init_args`) but got {spec!r}."
        )
    return {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}


def _fill_num_labels(spec: dict[str, Any], checkpoint: Mapping[str, Any]) -> None:
    """Adds the run's ``num_labels`` (linked from the data at run time) to a student spec that takes but lacks it."""
    num_labels = (checkpoint.get("hyper_parameters") or {}).get("num_labels")
    if num_labels is None or "num_labels" in spec["init_args"]:
        return
    try:
        parameters = inspect.signature(_import(spec["class_path"])).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return  # load_exported reports a class_path that does not import
    if "num_labels" in parameters:
        spec["init_args"]["num_labels"] = num_labels


def _tokenizer_name(config: Mapping[str, Any] | None, checkpoint: Mapping[str, Any]) -> str | None:
    """The student's tokenizer: ``student_tokenizer`` or else ``tokenizer`` of the data (config, then checkpoint)."""
    sources = [_init_args(config.get("data")) if config else {}, checkpoint.get("datamodule_hyper_parameters") or {}]
    for data in sources:
        for key in ("student_tokenizer", "tokenizer"):
            if isinstance(data.get(key), str):
                return data[key]
    return None


def export_checkpoint(
    ckpt_path: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | None = None
) -> Path:
    """Writes the student of a ``DistillationModule`` checkpoint alone into a folder (``lit-kd export``).

    A ``transformers`` student is rebuilt from the checkpoint's ``"lit_kd_student"`` record and written with
    ``save_pretrained`` (``AutoModelForSequenceClassification.from_pretrained(out)`` loads it). Any other student is
    written as ``out/student.pt`` (its state dict) and ``out/student.yaml`` (the ``class_path``/``init_args`` of
    ``model.init_args.student`` in ``config``, plus the run's ``num_labels`` when the YAML left it to be linked from
    the data; :func:`load_exported` rebuilds it). The tokenizer of the run's data
    (``data.init_args.student_tokenizer`` or ``tokenizer`` in ``config``, else in the checkpoint's data
    hyper-parameters) is saved into ``out`` too. Neither the teacher nor the student is built from ``config``: only
    the YAML is read, so no teacher checkpoint it names is opened.

    Args:
        ckpt_path: The checkpoint (e.g. ``runs/distill_sst2_minilm/checkpoints/best.ckpt``).
        out: The folder to write (created if missing).
        config: The run's YAML (the ``--config`` of ``lit-kd fit``); needed only for students that are not
            ``transformers`` models, and to find the tokenizer.

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: If ``ckpt_path`` or ``config`` is not a file.
        ValueError: If the checkpoint holds no student, or the student is not a ``transformers`` model and no
            ``config`` is given.
    """
    ckpt_path, out = Path(ckpt_path), Path(out)
    checkpoint = _read_checkpoint(ckpt_path, "ckpt_path")
    settings = _read_config(config) if config is not None else None
    record = checkpoint.get(STUDENT_RECORD_KEY)
    if record is not None and record.get("kind") == "transformers":
        out.mkdir(parents=True, exist_ok=True)
        _load_student(checkpoint, ckpt_path, None).save_pretrained(out)
    else:
        state = _student_state(checkpoint, ckpt_path)
        if record is None and settings is not None:
            warnings.warn(
                f"The checkpoint {ckpt_path} holds no `{STUDENT_RECORD_KEY}` record (it predates them), so its "
                f"student is written as {STUDENT_WEIGHTS} + {STUDENT_SPEC} from the config's `model.init_args.student`,"
                " even if it is a `transformers` model; rebuilding it runs that entry (which may read the teacher).",
                stacklevel=2,
            )
        if settings is None:
            why = (
                f"the student of {ckpt_path} is a {record['class']}, not a `transformers` model"
                if record is not None
                else f"{ckpt_path} holds no `{STUDENT_RECORD_KEY}` record to rebuild its student from"
            )
            raise ValueError(
                f"Expected `config` (the run's YAML, which says how to build the student) since {why}, but got None; "
                "pass `--config`."
            )
        spec = _student_spec(settings, config)
        _fill_num_labels(spec, checkpoint)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, out / STUDENT_WEIGHTS)
        with open(out / STUDENT_SPEC, "w", encoding="utf-8") as f:
            f.write(f"# The student of {ckpt_path}: rebuild it with lit_kd.export.load_exported({str(out)!r}).\n")
            yaml.safe_dump(spec, f, sort_keys=False)
    tokenizer = _tokenizer_name(settings, checkpoint)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        from lit_kd.students import resolve_name_or_path

        AutoTokenizer.from_pretrained(resolve_name_or_path(tokenizer)).save_pretrained(out)
    return out


def load_exported(path: str | os.PathLike) -> nn.Module:
    """Reads back a folder written by :func:`export_checkpoint` (``lit-kd export``).

    Args:
        path: The folder: a ``save_pretrained`` folder (``config.json``), or ``student.pt`` with ``student.yaml``.

    Returns:
        The student with the exported weights, on the CPU.

    Raises:
        FileNotFoundError: If the folder holds neither layout.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        import transformers

        with open(path / "config.json", encoding="utf-8") as f:
            architectures = json.load(f).get("architectures") or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        return (cls or transformers.AutoModel).from_pretrained(path)
    if not (path / STUDENT_WEIGHTS).is_file() or not (path / STUDENT_SPEC).is_file():
        raise FileNotFoundError(
            f"Expected `path` to be a folder written by `lit-kd export` (config.json, or {STUDENT_WEIGHTS} with "
            f"{STUDENT_SPEC}) but {str(path)!r} holds neither."
        )
    from jsonargparse import ArgumentParser

    with open(path / STUDENT_SPEC, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--student", type=nn.Module)
    parsed = parser.parse_object({"student": spec})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse < 4.49
    student = instantiate(parsed).student
    student.load_state_dict(torch.load(path / STUDENT_WEIGHTS, map_location="cpu", weights_only=True))
    return student
