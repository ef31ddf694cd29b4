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
- :func:`allow_model_modules` trusts more modules: a class named by a checkpoint, a ``student.yaml`` or a config is
  imported only from ``lit_kd``, ``torch.nn``, ``transformers`` and the modules allowed so (or listed, comma
  separated, in ``$LIT_KD_ALLOWED_MODULES``), and only when it is an ``nn.Module`` subclass (or, in a
  ``student.yaml``, a function returning one).

Checkpoints are read with ``torch.load(..., weights_only=True)`` and ``transformers`` files with
``trust_remote_code=False``; outputs are written atomically (a temporary file or folder next to the target,
renamed into place).

Example:
    >>> student = load_student("runs/distill_sst2_minilm/checkpoints/best.ckpt")  # doctest: +SKIP
    >>> student = load_student("runs/distill/checkpoints/best.ckpt", MyStudent(...))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from lit_kd._files import atomic_folder, atomic_write, load_torch_file, read_checkpoint
from lit_kd.adaptors import is_transformers_model

__all__ = [
    "ALLOWED_MODULES_ENV",
    "STUDENT_RECORD_KEY",
    "allow_model_modules",
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

ALLOWED_MODULES_ENV = "LIT_KD_ALLOWED_MODULES"
"""The environment variable whose comma-separated module names are trusted as :func:`allow_model_modules` trusts."""

_DEFAULT_ALLOWED_MODULES = ("lit_kd", "torch.nn", "transformers")
_allowed_modules: list[str] = []
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")

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
    (``_orig_mod.``, ``module.``), so the file loads into the user's own class with ``load_state_dict``. The file is
    written atomically (a temporary file next to it, renamed into place); so is the folder when it does not exist
    yet (see :func:`lit_kd._files.atomic_folder` for one that does).

    Args:
        model: The model, possibly compiled or wrapped (DDP, Lightning).
        path: A folder for ``transformers`` models; a file (e.g. ``student.pt``) otherwise.

    Returns:
        The path written.
    """
    path = Path(path)
    model = unwrap_model(model)
    if is_transformers_model(model):
        with atomic_folder(path) as tmp:
            model.save_pretrained(tmp)
    else:
        with atomic_write(path) as f:
            torch.save(_clean_state_dict(model.state_dict()), f)
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


def allow_model_modules(*modules: str) -> tuple[str, ...]:
    """Trusts more modules to hold the student classes that checkpoints and exported folders name.

    A class named by a file (the ``"lit_kd_student"`` record of a checkpoint, the ``class_path`` of a
    ``student.yaml`` or of a config's student) is imported only if its module is ``lit_kd``, ``torch.nn``,
    ``transformers`` or a module allowed here or in ``$LIT_KD_ALLOWED_MODULES`` (comma separated; e.g.
    ``LIT_KD_ALLOWED_MODULES=my_project.models lit-kd export ...``), or a submodule of one; any other name (e.g.
    ``os.system``) is refused before anything is imported. An allowed name must then be an ``nn.Module`` subclass
    (in a ``student.yaml``, a function annotated to return one, such as ``lit_kd.factories.bert_student``, also
    does). Allow only modules whose import you trust: importing a module runs its code.

    Args:
        *modules: Module names, e.g. ``"my_project.models"`` (a trailing ``.`` is ignored); none to only read the
            list.

    Returns:
        The modules trusted now: the defaults, those allowed by this function, then those of the environment.

    Raises:
        ValueError: If a name is not a dotted Python module name.

    Example:
        >>> "my_project.models" in allow_model_modules("my_project.models")  # doctest: +SKIP
        True
    """
    for module in modules:
        name = module.rstrip(".") if isinstance(module, str) else module
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
            raise ValueError(
                f"Expected `modules` to be dotted module names such as 'my_project.models' but got {module!r}."
            )
        if name not in _allowed_modules:
            _allowed_modules.append(name)
    from_env = [m.strip().rstrip(".") for m in os.environ.get(ALLOWED_MODULES_ENV, "").split(",") if m.strip()]
    return tuple(dict.fromkeys([*_DEFAULT_ALLOWED_MODULES, *_allowed_modules, *from_env]))


def _import(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    obj = importlib.import_module(module)
    for part in name.split("."):  # a qualname of a nested class, e.g. "Outer.Inner"
        obj = getattr(obj, part)
    return obj


def _returns_module(function: Any) -> bool:
    """Whether ``function`` is a function annotated to return an ``nn.Module`` (subclass)."""
    if not inspect.isfunction(function):
        return False
    try:
        returned = typing.get_type_hints(function).get("return")
    except Exception:  # an annotation that does not resolve
        return False
    return isinstance(returned, type) and issubclass(returned, nn.Module)


def _check_allowed(dotted: Any, source: str) -> str:
    """``dotted`` when it is a dotted name in an allowed module, else a ``ValueError`` naming it and ``source``."""
    if not isinstance(dotted, str) or not _DOTTED.fullmatch(dotted):
        raise ValueError(f"Expected {source} to name a class as `module.Class` but got {dotted!r}.")
    allowed = allow_model_modules()
    if not any(dotted.startswith(f"{module}.") for module in allowed):
        module = dotted.rpartition(".")[0]
        raise ValueError(
            f"Refusing to import {dotted!r} named in {source}: expected a class in one of the trusted modules "
            f"({', '.join(allowed)}), since importing a module runs its code. If you trust {source}, allow the "
            f"module with `lit_kd.export.allow_model_modules({module!r})` or ${ALLOWED_MODULES_ENV}={module}."
        )
    return dotted


def _import_model_class(dotted: Any, source: str, functions: bool = False) -> Any:
    """The ``nn.Module`` subclass (or, with ``functions``, factory function) named in ``source``, once allowed.

    Raises:
        ValueError: If the name is not in an allowed module (nothing is imported then).
        ImportError: If it does not import.
        TypeError: If it names something else than an ``nn.Module`` subclass (or a function returning one).
    """
    _check_allowed(dotted, source)
    try:
        obj = _import(dotted)
    except (ImportError, AttributeError) as e:
        raise ImportError(
            f"Expected the student class {dotted!r} named in {source} to be importable but it is not: {e}"
        ) from e
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return obj
    if functions and _returns_module(obj):
        return obj
    what = "an nn.Module subclass" + (" or a function annotated to return one" if functions else "")
    raise TypeError(f"Expected {dotted!r} named in {source} to be {what} but got {type(obj).__name__} {obj!r}.")


def _student_record_of(checkpoint: Mapping[str, Any], path: Path) -> Mapping[str, Any] | None:
    record = checkpoint.get(STUDENT_RECORD_KEY)
    if record is not None and not isinstance(record, Mapping):
        raise ValueError(
            f"Expected the `{STUDENT_RECORD_KEY}` entry of the checkpoint {path} to be a mapping (see "
            f"`lit_kd.export.student_record`) but got {type(record).__name__}."
        )
    return record


def _model_from_record(record: Mapping[str, Any], path: Path) -> nn.Module:
    """A freshly initialised ``transformers`` model of the record's class and configuration, in eval mode."""
    from transformers import AutoConfig

    cls = _import_model_class(record.get("class"), f"the `{STUDENT_RECORD_KEY}` record of the checkpoint {path}")
    if not callable(getattr(cls, "_from_config", None)) or not isinstance(record.get("config"), Mapping):
        raise TypeError(
            f"Expected the `{STUDENT_RECORD_KEY}` record of the checkpoint {path} to name a `transformers` model "
            f"class with its `config` mapping but got {record.get('class')!r} with "
            f"{type(record.get('config')).__name__}."
        )
    config_class = getattr(cls, "config_class", None)
    if config_class is not None:
        config = config_class.from_dict(record["config"])
    else:
        config = AutoConfig.for_model(**record["config"])
    return cls._from_config(config).eval()


def _read_checkpoint(path: str | os.PathLike, arg: str = "checkpoint_path") -> dict[str, Any]:
    # mmap: tensors are read when used, so a checkpoint that also holds teachers (`save_teacher=True`) does not bring
    # their weights into memory. Empty, truncated and foreign files, and pickled callables, raise a ValueError.
    return read_checkpoint(path, arg, mmap=True)


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
        ValueError: If the file is empty, truncated, not a Lightning checkpoint, or holds pickled objects that
            ``torch.load(..., weights_only=True)`` refuses (a function, a class); if it holds no ``student.*``
            weights; if ``student`` is ``None`` and the checkpoint has no ``transformers`` record, or its record names
            a class outside the trusted modules (:func:`allow_model_modules`); or if the weights do not fit the
            student.
    """
    path = Path(checkpoint_path)
    return _load_student(_read_checkpoint(path), path, student)


def _load_student(checkpoint: Mapping[str, Any], path: Path, student: nn.Module | None) -> nn.Module:
    state = _student_state(checkpoint, path)
    if student is None:
        record = _student_record_of(checkpoint, path)
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


def _fill_num_labels(spec: dict[str, Any], checkpoint: Mapping[str, Any], config: str | os.PathLike) -> None:
    """Adds the run's ``num_labels`` (linked from the data at run time) to a student spec that takes but lacks it."""
    hyper_parameters = checkpoint.get("hyper_parameters")
    num_labels = hyper_parameters.get("num_labels") if isinstance(hyper_parameters, Mapping) else None
    if num_labels is None or "num_labels" in spec["init_args"]:
        return
    _check_allowed(spec["class_path"], f"`model.init_args.student` of the config {os.fspath(config)}")
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
            if isinstance(data, Mapping) and isinstance(data.get(key), str):
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
    the YAML is read, so no teacher checkpoint it names is opened. Everything is written into a temporary folder next
    to ``out`` and moved into place at the end (:func:`lit_kd._files.atomic_folder`): a failed export leaves no
    partial folder.

    Args:
        ckpt_path: The checkpoint (e.g. ``runs/distill_sst2_minilm/checkpoints/best.ckpt``).
        out: The folder to write (created if missing).
        config: The run's YAML (the ``--config`` of ``lit-kd fit``); needed only for students that are not
            ``transformers`` models, and to find the tokenizer.

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: If ``ckpt_path`` or ``config`` is not a file.
        ValueError: If the checkpoint is not one (see :func:`load_student`) or holds no student, if the student is
            not a ``transformers`` model and no ``config`` is given, or if the class to rebuild is outside the
            trusted modules (:func:`allow_model_modules`).
    """
    ckpt_path, out = Path(ckpt_path), Path(out)
    checkpoint = _read_checkpoint(ckpt_path, "ckpt_path")
    settings = _read_config(config) if config is not None else None
    record = _student_record_of(checkpoint, ckpt_path)
    if record is not None and record.get("kind") == "transformers":
        student = _load_student(checkpoint, ckpt_path, None)
        with atomic_folder(out) as tmp:
            student.save_pretrained(tmp)
            _save_tokenizer(settings, checkpoint, tmp)
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
        _fill_num_labels(spec, checkpoint, config)
        with atomic_folder(out) as tmp:
            torch.save(state, tmp / STUDENT_WEIGHTS)
            with open(tmp / STUDENT_SPEC, "w", encoding="utf-8") as f:
                f.write(f"# The student of {ckpt_path}: rebuild it with lit_kd.export.load_exported({str(out)!r}).\n")
                yaml.safe_dump(spec, f, sort_keys=False)
            _save_tokenizer(settings, checkpoint, tmp)
    return out


def _save_tokenizer(settings: Mapping[str, Any] | None, checkpoint: Mapping[str, Any], out: Path) -> None:
    """Saves the tokenizer of the run's data (:func:`_tokenizer_name`), if any, into ``out``."""
    tokenizer = _tokenizer_name(settings, checkpoint)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        from lit_kd.students import resolve_name_or_path

        AutoTokenizer.from_pretrained(resolve_name_or_path(tokenizer), trust_remote_code=False).save_pretrained(out)


def load_exported(path: str | os.PathLike) -> nn.Module:
    """Reads back a folder written by :func:`export_checkpoint` (``lit-kd export``).

    A ``save_pretrained`` folder is read with ``trust_remote_code=False``: code it ships (an ``auto_map`` in
    ``config.json``) is never run. Every ``class_path`` of ``student.yaml`` must lie in a trusted module
    (:func:`allow_model_modules`) and is checked before anything is imported; ``student.pt`` is read with
    ``weights_only=True``.

    Args:
        path: The folder: a ``save_pretrained`` folder (``config.json``), or ``student.pt`` with ``student.yaml``.

    Returns:
        The student with the exported weights, on the CPU.

    Raises:
        FileNotFoundError: If the folder holds neither layout.
        ValueError: If ``student.yaml`` names a class outside the trusted modules, or ``student.pt`` is not a state
            dict that loads with ``weights_only=True``.
        TypeError: If ``student.yaml`` names something else than an ``nn.Module`` subclass or a function returning
            one.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        import transformers

        with open(path / "config.json", encoding="utf-8") as f:
            architectures = json.load(f).get("architectures") or []
        cls = (
            getattr(transformers, architectures[0], None)
            if architectures and isinstance(architectures[0], str)
            else None
        )
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            cls = None  # e.g. a custom architecture: AutoModel reads the config's model type
        return (cls or transformers.AutoModel).from_pretrained(path, trust_remote_code=False)
    if not (path / STUDENT_WEIGHTS).is_file() or not (path / STUDENT_SPEC).is_file():
        raise FileNotFoundError(
            f"Expected `path` to be a folder written by `lit-kd export` (config.json, or {STUDENT_WEIGHTS} with "
            f"{STUDENT_SPEC}) but {str(path)!r} holds neither."
        )
    from jsonargparse import ArgumentParser

    with open(path / STUDENT_SPEC, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    source = f"the `class_path` of {path / STUDENT_SPEC}"
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(f"Expected {path / STUDENT_SPEC} to hold a `class_path` (with `init_args`) but got {spec!r}.")
    _import_model_class(spec["class_path"], source, functions=True)
    for nested in _nested_class_paths(spec.get("init_args")):  # jsonargparse would import these too
        _check_allowed(nested, f"a nested `class_path` of {path / STUDENT_SPEC}")
    state = load_torch_file(path / STUDENT_WEIGHTS, "path", f"a folder whose {STUDENT_WEIGHTS} is a state dict")
    if not isinstance(state, Mapping):
        raise ValueError(
            f"Expected {path / STUDENT_WEIGHTS} to hold a state dict (a mapping of tensors) but got "
            f"{type(state).__name__}."
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--student", type=nn.Module)
    parsed = parser.parse_object({"student": spec})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse < 4.49
    student = instantiate(parsed).student
    student.load_state_dict(state)
    return student


def _nested_class_paths(value: Any) -> list[Any]:
    """Every ``class_path`` value inside ``value`` (nested mappings and lists)."""
    if isinstance(value, Mapping):
        found = [value["class_path"]] if "class_path" in value else []
        return found + [path for item in value.values() for path in _nested_class_paths(item)]
    if isinstance(value, list | tuple):
        return [path for item in value for path in _nested_class_paths(item)]
    return []
