"""``lit-kt``: the LightningCLI for knowledge tracing (``lit-kt fit|validate|test|predict --config FILE``).

The data module's ``num_exercises`` is linked into the model (``model.init_args.model.init_args.num_exercises``), so
configs never repeat it. ``num_questions`` (AKT's Rasch embeddings) is not linked, since SAKT and DKT have no such
argument: set ``model.init_args.model.init_args.num_questions`` to the data's (``KTDataModule.num_questions``, the
largest question id with ``--data.question_col``); the data module checks it covers the data before the first batch.
``fit --test_after_fit true`` tests the best checkpoint (by the checkpoint callback's monitor, else the last weights)
on the test split right after training and prints the test AUC (and, on simulated students, the oracle AUC).

Checkpoints and exercise ids: with ``--ckpt_path FILE`` (``validate``, ``test``, ``predict``, and ``fit`` when
resuming), the model's ``num_exercises`` and ``max_len`` are the checkpoint's, read from its saved model spec, not
the data's or the YAML's (the other settings stay the YAML's). The data may use fewer ids; an id above the
checkpoint's range is an error naming the file and line. After instantiation, ``--data.max_len`` is checked
against the model's ``max_len``, so that a mismatch fails before the trainer starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import ArgsType, LightningCLI

from lit_kt.data import ExerciseIdError, KTDataModule, check_max_len
from lit_kt.module import KTModule

# `ckpt_path` values Lightning resolves itself (no file to read here).
_SPECIAL_CKPT_PATHS = ("best", "last", "hpc")


def checkpoint_model_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model spec (``{"class_path", "init_args"}``) saved in a ``KTModule`` checkpoint's hyperparameters.

    Args:
        path: A checkpoint written by Lightning for a :class:`~lit_kt.KTModule`.

    Returns:
        The spec; its ``init_args`` hold at least ``num_exercises``.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the file cannot be read as a checkpoint or holds no KT model spec.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"Expected `--ckpt_path` to name a checkpoint file but {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated or foreign files raise many different errors
        raise ValueError(
            f"Expected `--ckpt_path` {path} to be a Lightning checkpoint readable by torch.load but got"
            f" {type(e).__name__}: {e}"
        ) from e
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    spec = hparams.get("model") if isinstance(hparams, dict) else None
    init_args = spec.get("init_args") if isinstance(spec, dict) else None
    if not isinstance(init_args, dict) or not isinstance(init_args.get("num_exercises"), int):
        raise ValueError(
            f"Expected `--ckpt_path` {path} to be a KTModule checkpoint, whose hyper_parameters['model'] holds"
            " {'class_path', 'init_args'} with an integer `num_exercises`, but got"
            f" {'no hyper_parameters' if hparams is None else f'model = {spec!r}'}."
        )
    return spec


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


class KTCLI(TestAfterFitCLI):
    """The ``lit-kt`` CLI: links the data's ``num_exercises`` into the model; reports the oracle AUC if known.

    With ``--ckpt_path FILE``, ``num_exercises`` and the model's ``max_len`` come from the checkpoint (see the module
    docstring); a ``--data.num_exercises`` that disagrees with the checkpoint is an error.
    """

    _ckpt_spec: tuple[str, dict[str, Any]] | None = None  # (path, model spec) of `--ckpt_path FILE`

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments(
            "data.num_exercises", "model.init_args.model.init_args.num_exercises", apply_on="instantiate"
        )

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config.get(str(self.subcommand), self.config)
        ckpt = config.get("ckpt_path")
        if not isinstance(ckpt, str | os.PathLike) or str(ckpt) in _SPECIAL_CKPT_PATHS:
            return
        if str(ckpt).startswith("registry") or "://" in str(ckpt):
            return  # resolved by Lightning (model registry, remote file systems)
        spec = checkpoint_model_spec(ckpt)
        self._ckpt_spec = (str(ckpt), spec)
        init_args = spec["init_args"]
        num_exercises = init_args["num_exercises"]
        given = config.get("data.num_exercises")
        if given is not None and given != num_exercises:
            raise ValueError(
                f"Expected `--data.num_exercises` to be unset or equal to the checkpoint's `num_exercises`"
                f" ({num_exercises}, in {ckpt}) but got {given}."
            )
        config["data.num_exercises"] = num_exercises
        key = "model.init_args.model.init_args.max_len"
        if "max_len" in init_args and config.get(key) is not None:
            config[key] = init_args["max_len"]

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ExerciseIdError as e:
            if self._ckpt_spec is None:
                raise
            raise ExerciseIdError(
                e.path, e.line, f"{e.message} (`num_exercises` is the checkpoint's, {self._ckpt_spec[0]})"
            ) from e
        model = getattr(self.model, "model", None)
        origin = f", from the checkpoint {self._ckpt_spec[0]}" if self._ckpt_spec is not None else ""
        if self.datamodule is not None:
            check_max_len(self.datamodule.hparams.max_len, getattr(model, "max_len", None), origin)

    def summary(self, metrics: dict[str, float]) -> str:
        line = f"test AUC: {metrics['test/auc']:.4f}"
        oracle = self.datamodule.oracle_auc()
        if oracle is not None:
            line += (
                f" (simulated students: oracle AUC {oracle:.4f}, the best any model can reach from the history;"
                f" true-probability AUC {self.datamodule.true_probability_auc():.4f}, an unreachable bound)"
            )
        return line


def build_cli(args: ArgsType = None, run: bool = True, cli_class: type[KTCLI] = KTCLI) -> KTCLI:
    """Build (and with ``run``, execute) the ``lit-kt`` CLI; ``args`` as in ``LightningCLI``."""
    return cli_class(
        KTModule,
        KTDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def release_process_group() -> None:
    """Destroy the process group Lightning created, if any, before the interpreter exits.

    Lightning leaves the group alive after ``fit``/``test``; destroying it only at interpreter exit lets gloo's
    background threads be torn down mid-flight, which can abort a process (``terminate called without an active
    exception``) and leave ``torchrun`` waiting for it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(args: ArgsType = None) -> None:
    """Entry point of ``lit-kt``."""
    build_cli(args)
    release_process_group()


if __name__ == "__main__":
    main()
