"""``lit-kd``: the LightningCLI for distillation and fine-tuning (``lit-kd fit|validate|test --config FILE``).

The model is any LightningModule given by ``class_path`` (``lit_kd.DistillationModule`` to distil,
``lit_kd.ClassifierModule`` to fine-tune a teacher first), and so is the data module (``lit_kd.data.
TextClassificationDataModule`` for text, ``lit_kt.KTDataModule`` for knowledge tracing). Teachers and students are
``class_path``/``init_args`` entries: a class (``lit_kt.SAKT``, ``lit_kd.students.BiGRUClassifier``) or a factory
of :mod:`lit_kd.factories` that builds a ``transformers`` model from a name or path, or loads a checkpoint.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import ArgsType

from lit_kt.cli import TestAfterFitCLI, release_process_group


class KDCLI(TestAfterFitCLI):
    """The ``lit-kd`` CLI: any LightningModule and data module by ``class_path``; ``fit --test_after_fit true``."""


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


def main(args: ArgsType = None) -> None:
    """Entry point of ``lit-kd``."""
    build_cli(args)
    release_process_group()


if __name__ == "__main__":
    main()
