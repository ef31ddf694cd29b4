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


class KTCLI(LightningCLI):
    """LightningCLI with the data-to-model links of knowledge tracing and an optional test after ``fit``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            "data.num_exercises", "model.init_args.model.init_args.num_exercises", apply_on="instantiate"
        )
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, test the best checkpoint on the test split."
        )

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        callback = self.trainer.checkpoint_callback
        ckpt = "best" if callback is not None and callback.best_model_path else None
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        if self.trainer.is_global_zero and results:
            line = f"test AUC: {results[0]['test/auc']:.4f}"
            oracle = self.datamodule.oracle_auc()
            if oracle is not None:
                line += (
                    f" (simulated students: oracle AUC {oracle:.4f}, the best any model can reach from the history;"
                    f" true-probability AUC {self.datamodule.true_probability_auc():.4f}, an unreachable bound)"
                )
            print(line)


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


def main(args: ArgsType = None) -> None:
    """Entry point of ``lit-kt``."""
    build_cli(args)


if __name__ == "__main__":
    main()
