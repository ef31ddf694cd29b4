"""``lit-kt``: the LightningCLI for knowledge tracing (``lit-kt fit|validate|test|predict --config FILE``).

The data module's ``num_exercises`` is linked into the model (``model.init_args.model.init_args.num_exercises``), so
configs never repeat it. ``fit --test_after_fit true`` tests the best checkpoint (by the checkpoint callback's
monitor, else the last weights) on the test split right after training and prints the test AUC (and, on simulated
students, the oracle AUC).
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningCLI

from lit_kt.data import KTDataModule
from lit_kt.module import KTModule


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
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        if self.trainer.is_global_zero and results:
            print(self.summary(results[0]))
        self.trainer.strategy.barrier("test_after_fit")  # the processes leave together (see `main`)

    def summary(self, metrics: dict[str, float]) -> str:
        """The line printed after the test of ``--test_after_fit``."""
        return "test: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class KTCLI(TestAfterFitCLI):
    """The ``lit-kt`` CLI: links the data's ``num_exercises`` into the model; reports the oracle AUC if known."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments(
            "data.num_exercises", "model.init_args.model.init_args.num_exercises", apply_on="instantiate"
        )

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
