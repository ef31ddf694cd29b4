"""``lit-kd``: the LightningCLI for distillation and fine-tuning (``lit-kd fit|validate|test --config FILE``), and
``lit-kd export`` to get the student out of a run.

The model is any LightningModule given by ``class_path`` (``lit_kd.DistillationModule`` to distil,
``lit_kd.ClassifierModule`` to fine-tune a teacher first), and so is the data module (``lit_kd.data.
TextClassificationDataModule`` for text, ``lit_kt.KTDataModule`` for knowledge tracing). Teachers and students are
``class_path``/``init_args`` entries: a class (``lit_kt.SAKT``, ``lit_kd.students.BiGRUClassifier``) or a factory
of :mod:`lit_kd.factories` that builds a ``transformers`` model from a name or path, or loads a checkpoint.

``lit-kd export --ckpt_path CKPT --out DIR [--config RUN.yaml]`` writes the student of a ``DistillationModule``
checkpoint alone, without building the teacher or reading its weights: a ``transformers`` student is rebuilt from the
checkpoint's own record and written with ``save_pretrained`` (``AutoModelForSequenceClassification.from_pretrained(
DIR)`` loads it); any other student goes to ``DIR/student.pt`` (its state dict) and ``DIR/student.yaml`` (its
``class_path``/``init_args`` from the run's ``--config``; ``lit_kd.export.load_exported(DIR)`` rebuilds it). The
tokenizer named by the run's data (``data.init_args.tokenizer``) is saved into ``DIR`` too.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.cli import ArgsType, LightningCLI

from lit_kd.export import export_checkpoint


class TestAfterFitCLI(LightningCLI):
    """LightningCLI with ``fit --test_after_fit true``: test the best checkpoint right after training."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, test the best checkpoint on the test split."
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would overwrite the model's config with the checkpoint's saved hyperparameters when
        # `--ckpt_path FILE` is given; the modules do not save their optimizer (a callable), so a resumed run would
        # silently fall back to the default optimizer. The YAML stays authoritative; the weights, optimizer and
        # loop state still come from the checkpoint.
        return

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        callback = self.trainer.checkpoint_callback
        ckpt = "best" if callback is not None and callback.best_model_path else None
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=True)
        if self.trainer.is_global_zero and results:
            print(self.summary(results[0]))
        self.trainer.strategy.barrier("test_after_fit")  # the processes leave together (see `main`)

    def summary(self, metrics: dict[str, float]) -> str:
        """The line printed after the test of ``--test_after_fit``."""
        return "test: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def release_process_group() -> None:
    """Destroy the process group Lightning created, if any, before the interpreter exits.

    Lightning leaves the group alive after ``fit``/``test``; destroying it only at interpreter exit lets gloo's
    background threads be torn down mid-flight, which can abort a process (``terminate called without an active
    exception``) and leave ``torchrun`` waiting for it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _num_labels_slots(node: Any, path: str) -> Iterator[tuple[str, Namespace]]:
    """``(config path, init_args)`` of every ``class_path`` entry under ``node`` whose ``init_args`` has ``num_labels``
    (the classes that take it), searching ``init_args``, lists and dicts at any depth."""
    if isinstance(node, Namespace):
        init_args = node.get("init_args")
        if isinstance(node.get("class_path"), str) and isinstance(init_args, Namespace) and "num_labels" in init_args:
            yield f"{path}.init_args.num_labels", init_args
        for key, value in vars(node).items():
            yield from _num_labels_slots(value, f"{path}.{key}")
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _num_labels_slots(value, f"{path}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _num_labels_slots(value, f"{path}[{i}]")


def _data_takes_num_labels(data: Any) -> bool:
    if not isinstance(data, Namespace) or not isinstance(data.get("class_path"), str):
        return False
    module, _, name = data.class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return "num_labels" in inspect.signature(cls).parameters and isinstance(data.get("init_args"), Namespace)


def _instantiate_data(data: Namespace) -> L.LightningDataModule:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", fail_untyped=False, required=True)
    return parser.instantiate(Namespace(data=data.clone())).data


def link_num_labels(config: Namespace) -> int | None:
    """Makes the data module and every model of a parsed ``lit-kd`` config agree on ``num_labels`` (in place).

    The model tree (the LightningModule's ``init_args`` with its teachers and student, in lists and dicts too) may set
    ``num_labels`` in several places; every value that is not ``None`` must be the same, the model's number of
    classes. When the data module's class takes ``num_labels`` (``TextClassificationDataModule`` does):

    - with a model value, the data's ``num_labels`` must be ``None`` or equal, and is set to it, so that the data
      module checks every label of every split against the model's classes and names the file and line of a bad one;
    - without one, the data's ``num_labels`` is used, or when it is ``None`` the data module is built from its config
      to read its ``num_labels`` property (``TextClassificationDataModule`` reads ``train.tsv``'s labels and loads no
      tokenizer); that value is written into the data's and every ``None`` ``num_labels`` of the model tree.

    Data modules without ``num_labels`` (e.g. ``lit_kt.KTDataModule``) are left alone.

    Args:
        config: The parsed config of one subcommand (with ``model`` and ``data``), changed in place.

    Returns:
        The number of classes linked, or ``None`` when there is none to link.

    Raises:
        ValueError: If two ``num_labels`` of the model tree, or the model's and the data's, differ.
    """
    slots = list(_num_labels_slots(config.get("model"), "model"))
    given = {path: args.num_labels for path, args in slots if args.num_labels is not None}
    if len(set(given.values())) > 1:
        found = ", ".join(f"{path}={value}" for path, value in given.items())
        raise ValueError(f"Expected every `num_labels` of the model to be the same but got {found}.")
    value = next(iter(given.values()), None)
    data = config.get("data")
    if _data_takes_num_labels(data):
        data_value = data.init_args.get("num_labels")
        if value is not None and data_value not in (None, value):
            raise ValueError(
                f"Expected `data.init_args.num_labels` to be None or {value} (the model's, {next(iter(given))})"
                f" but got {data_value}."
            )
        if value is None and slots:
            value = data_value if data_value is not None else _instantiate_data(data).num_labels
        if value is not None:
            data.init_args.num_labels = value
    if value is not None:
        for _, args in slots:
            if args.num_labels is None:
                args.num_labels = value
    return value


class KDCLI(TestAfterFitCLI):
    """The ``lit-kd`` CLI: any LightningModule and data module by ``class_path``; ``fit --test_after_fit true``.

    Before any class is built, the data's and the models' ``num_labels`` are linked (see :func:`link_num_labels`).
    """

    def before_instantiate_classes(self) -> None:
        link_num_labels(self.config.get(str(self.subcommand), self.config))


def build_cli(args: ArgsType = None, run: bool = True, cli_class: type[KDCLI] = KDCLI) -> KDCLI:
    """Build (and with ``run``, execute) the ``lit-kd`` CLI; ``args`` as in ``LightningCLI``."""
    return cli_class(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def export(args: list[str]) -> Path:
    """``lit-kd export --ckpt_path CKPT --out DIR [--config RUN.yaml]``: write the student of a checkpoint alone.

    Args:
        args: The words after ``export``; see :func:`lit_kd.export.export_checkpoint` for what is written.

    Returns:
        The folder written.
    """
    parser = argparse.ArgumentParser(
        prog="lit-kd export",
        description="Write the student of a DistillationModule checkpoint alone, without building or reading any "
        "teacher: save_pretrained for transformers students, else student.pt + student.yaml.",
    )
    parser.add_argument("--ckpt_path", required=True, help="The checkpoint of a `lit-kd fit` run.")
    parser.add_argument("--out", required=True, help="The folder to write.")
    parser.add_argument(
        "--config",
        default=None,
        help="The run's YAML: needed for students that are not transformers models; also names the tokenizer.",
    )
    ns = parser.parse_args(args)
    out = export_checkpoint(ns.ckpt_path, ns.out, config=ns.config)
    print(f"student written to {out}")
    return out


def main(args: ArgsType = None) -> None:
    """Entry point of ``lit-kd``: ``export`` (see :func:`export`), else the LightningCLI subcommands."""
    words = sys.argv[1:] if args is None else args
    if isinstance(words, (list, tuple)) and words and words[0] == "export":
        export(list(words[1:]))
        return
    build_cli(args)
    release_process_group()


if __name__ == "__main__":
    main()
