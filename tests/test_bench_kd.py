"""scripts/bench_kd.py on a miniature task: the seed protocol (same labelled batches for both students per seed), the
reported statistics, the teacher keyed by its training data, the transfer set and the carved split."""

from __future__ import annotations

import importlib
import statistics
import sys
from pathlib import Path

import pytest
import torch

from tests.ddp_helpers import KD_TRAIN_SIZE, tiny_bert, write_text_data

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("bench_kd")
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture()
def setup(tmp_path):
    data = write_text_data(tmp_path / "data")
    teacher = tmp_path / "base"
    model = tiny_bert(layers=6, width=32, seed=0)
    model.save_pretrained(teacher)
    (data / "tokenizer").rename(tmp_path / "tokenizer")
    for f in (tmp_path / "tokenizer").iterdir():
        f.rename(teacher / f.name)
    return data, teacher


def args(data: Path, teacher: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--data-dir", str(data), "--teacher", str(teacher), "--teacher-ckpt-dir", str(tmp_path / "ft"),
        "--steps", "2", "--teacher-steps", "2", "--batch-size", "2", "--max-length", "16", "--seeds", "2",
        "--log-every", "100", "--timing-warmup", "0", *extra,
    ]  # fmt: skip


def test_seeds_statistics_and_same_batches(bench, setup, tmp_path):
    data, teacher = setup
    out = bench.main(args(data, teacher, tmp_path, "--student", "2layer", "--json", str(tmp_path / "r.json")))
    assert out["seeds"] == [42, 43] and len(out["student_acc_kd_seeds"]) == len(out["student_acc_no_kd_seeds"]) == 2
    assert out["same_batches"] is True
    assert out["student_acc_kd"] == pytest.approx(statistics.fmean(out["student_acc_kd_seeds"]), abs=1e-4)
    gains = [k - p for k, p in zip(out["student_acc_kd_seeds"], out["student_acc_no_kd_seeds"])]
    assert out["kd_gain"] == pytest.approx(statistics.fmean(gains), abs=2e-4)
    assert out["kd_gain_se"] == pytest.approx(statistics.stdev(gains) / 2**0.5, abs=2e-4)
    assert out["retention"] == pytest.approx(out["student_acc_kd"] / out["teacher_acc"], abs=2e-4)
    assert (tmp_path / "r.json").is_file() and out["teacher_reused"] is False

    # The saved teacher is reused for the same data, and refused for other data.
    again = bench.main(args(data, teacher, tmp_path, "--student", "bigru", "--seeds", "1"))
    assert again["teacher_reused"] is True
    train = data / "train.tsv"
    train.write_text(train.read_text().replace("\t1\n", "\t0\n", 1))
    with pytest.raises(ValueError, match="fine-tuned for 2 labels on the training data of .* `--retrain-teacher`"):
        bench.main(args(data, teacher, tmp_path, "--student", "bigru", "--seeds", "1"))


def test_small_student_with_a_transfer_set_and_a_carved_split(bench, setup, tmp_path):
    data, teacher = setup
    extra = ("--student", "small", "--seeds", "1", "--transfer-augment", "1", "--carve-dev", "3")
    out = bench.main(args(data, teacher, tmp_path, *extra))
    assert out["same_batches"] is True  # the transfer rows do not change the labelled batches
    assert out["dev_size"] == 3 and "last 3 train rows" in out["dataset"]
    assert out["settings"]["kd"]["transfer_rows"] == KD_TRAIN_SIZE - 3
    assert out["student"] == "small" and out["settings"]["kd"]["hidden_weight"] == 1.0


def test_staged_distillation_weights(bench):
    """``--staged 0.4``: the matches alone before 40% of the steps, then the soft and hard labels alone."""
    a = bench.parse_args(
        [
            "--data-dir",
            "d",
            "--student",
            "2layer",
            "--staged",
            "0.4",
            "--attention-weight",
            "2",
            "--hard-label-weight",
            "1",
        ]
    )
    cfg = bench.kd_config(a, tiny_bert(layers=6, width=32, seed=0))
    assert [(m.feature, m.weight) for m in cfg.intermediate_matches] == [("hidden", 1.0), ("attention", 2.0)]
    for progress, matches, predictions in ((0.0, 1.0, 0.0), (0.39, 1.0, 0.0), (0.41, 0.0, 1.0), (1.0, 0.0, 1.0)):
        assert [cfg.match_weight_at(m, progress) for m in cfg.intermediate_matches] == [matches, 2 * matches]
        assert cfg.kd_loss_weight_at(progress) == predictions and cfg.hard_label_weight_at(progress) == predictions
    with pytest.raises(SystemExit):
        bench.parse_args(["--data-dir", "d", "--student", "2layer", "--staged", "1"])


def test_hard_label_weight_defaults_per_student(bench):
    """The BERT students distil without the label term by default (chosen on both splits); the BiGRU keeps it."""
    teacher = tiny_bert(layers=6, width=32, seed=0)
    for student, weight in (("2layer", 0.0), ("small", 0.0), ("bigru", 1.0)):
        a = bench.parse_args(["--data-dir", "d", "--student", student])
        assert a.hard_label_weight == weight and bench.kd_config(a, teacher).hard_label_weight == weight
    a = bench.parse_args(["--data-dir", "d", "--student", "2layer", "--hard-label-weight", "0.5"])
    assert bench.kd_config(a, teacher).hard_label_weight == 0.5


def test_transfer_rows_per_labelled_row_default_per_student(bench):
    """The 2-layer student reads three transfer rows per labelled row by default (chosen on both splits)."""
    for student, rows in (("2layer", 3), ("small", 1), ("bigru", 1)):
        assert bench.parse_args(["--data-dir", "d", "--student", student]).transfer_per_sample == rows
    chosen = bench.parse_args(["--data-dir", "d", "--student", "2layer", "--transfer-per-sample", "2"])
    assert chosen.transfer_per_sample == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--data-dir", "d", "--student", "2layer", "--transfer-per-sample", "0"])


def test_hidden_layers_uniform_is_tinybert_mapping(bench):
    """``--hidden-layers uniform``: student layer m against teacher layer m * N // M, embeddings (m = 0) included."""
    teacher = tiny_bert(layers=6, width=32, seed=0)
    last = bench.kd_config(bench.parse_args(["--data-dir", "d", "--student", "2layer"]), teacher)
    assert [(m.layer_s, m.layer_t) for m in last.intermediate_matches] == [(2, 6)]
    for student, pairs in (("2layer", [(0, 0), (1, 3), (2, 6)]), ("small", [(0, 0), (1, 1), (2, 3), (3, 4), (4, 6)])):
        a = bench.parse_args(["--data-dir", "d", "--student", student, "--hidden-layers", "uniform"])
        cfg = bench.kd_config(a, teacher)
        assert [(m.layer_s, m.layer_t) for m in cfg.intermediate_matches] == pairs
        assert {m.loss for m in cfg.intermediate_matches} == {"hidden_mse"}
        # The small student (256 wide) needs a projection per match into the teacher's width.
        assert all((m.projection is None) == (student == "2layer") for m in cfg.intermediate_matches)


def test_student_dropout_sets_every_dropout_of_both_runs(bench, setup, tmp_path, monkeypatch):
    data, teacher = setup
    seen = {}
    real = bench.fit

    def spy(name, module, *args, **kwargs):
        model = getattr(module, "student", None) or module.model
        seen[name] = sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)})
        return real(name, module, *args, **kwargs)

    monkeypatch.setattr(bench, "fit", spy)
    out = bench.main(args(data, teacher, tmp_path, "--student", "2layer", "--seeds", "1", "--student-dropout", "0"))
    assert out["settings"]["kd"]["student_dropout"] == 0.0
    # The teacher's fine-tuning keeps BERT's 0.1; both student runs drop nothing.
    assert seen == {"teacher": [0.1], "seed 42 student no_kd": [0.0], "seed 42 student kd": [0.0]}
    with pytest.raises(SystemExit):
        bench.parse_args(["--data-dir", "d", "--student-dropout", "1"])


@pytest.mark.parametrize("student", ["2layer", "bigru"])
def test_freeze_embeddings_keeps_the_word_table_fixed_in_both_runs(bench, setup, tmp_path, monkeypatch, student):
    data, teacher = setup
    before, after = {}, {}
    real = bench.fit

    def spy(name, module, *args, **kwargs):
        model = getattr(module, "student", None) or module.model
        table = model.get_input_embeddings().weight
        before[name] = table.detach().clone(), [p.detach().clone() for p in model.parameters()]
        timer = real(name, module, *args, **kwargs)
        after[name] = table.detach().clone(), [p.detach().clone() for p in model.parameters()]
        return timer

    monkeypatch.setattr(bench, "fit", spy)
    out = bench.main(args(data, teacher, tmp_path, "--student", student, "--seeds", "1", "--freeze-embeddings"))
    assert out["settings"]["kd"]["freeze_embeddings"] is True
    for name in ("seed 42 student no_kd", "seed 42 student kd"):
        (table0, params0), (table1, params1) = before[name], after[name]
        assert torch.equal(table0, table1)  # the word embeddings did not move ...
        assert sum(not torch.equal(a, b) for a, b in zip(params0, params1)) > 0  # ... while the rest trained
    # The teacher's fine-tuning is not affected: its table trains as before.
    assert not torch.equal(before["teacher"][0], after["teacher"][0])


def test_labelled_budget_and_the_rest_as_unlabelled_transfer_text(bench, setup, tmp_path, capsys):
    data, teacher = setup
    limit = KD_TRAIN_SIZE // 2
    out = bench.main(args(data, teacher, tmp_path, "--student", "bigru", "--seeds", "1", "--train-limit", str(limit)))
    assert out["labelled_rows"] == limit and out["train_rows"] == KD_TRAIN_SIZE
    assert out["settings"]["kd"]["transfer_unused_train"] is True
    assert out["settings"]["kd"]["transfer_rows"] == KD_TRAIN_SIZE - limit
    assert out["same_batches"] is True  # the labelled batches of both runs hold only the first `limit` rows
    # The default budget (2000 rows) covers this whole file: every row labelled, no transfer text, and it says so.
    out = bench.main(args(data, teacher, tmp_path, "--student", "bigru", "--seeds", "1", "--retrain-teacher"))
    assert out["labelled_rows"] == KD_TRAIN_SIZE and out["settings"]["kd"]["transfer_rows"] == 0
    assert "none beyond --train-limit 2000" in capsys.readouterr().out


def test_student_layers_choose_the_teacher_blocks(bench):
    teacher = tiny_bert(layers=6, width=32, seed=0)
    a = bench.parse_args(["--data-dir", "x", "--student", "2layer", "--student-layers", "1,4"])
    assert a.student_layers == (1, 4)
    student = bench.build_student("2layer", teacher, 100, 0, 2, layers=a.student_layers)
    blocks_t, blocks_s = teacher.bert.encoder.layer, student.bert.encoder.layer
    assert len(blocks_s) == 2
    for s, t in zip(blocks_s, (blocks_t[1], blocks_t[4]), strict=True):
        for ps, pt in zip(s.parameters(), t.parameters(), strict=True):
            assert ps.data_ptr() != pt.data_ptr() and (ps == pt).all()
    with pytest.raises(SystemExit):
        bench.parse_args(["--data-dir", "x", "--student", "2layer", "--student-layers", "1"])


def test_a_dev_curve_does_not_change_the_training_run(bench):
    """--eval-every only observes: the validation loader's seed draw must not change later dropout masks."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).square().mean()

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.net(batch[0]).square().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(16, 4))

    def train(validate: bool, keep: bool) -> torch.Tensor:
        L.seed_everything(0, verbose=False)
        model = Tiny()
        trainer = L.Trainer(
            max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1.0 if validate else 0,
            val_check_interval=2 if validate else None, check_val_every_n_epoch=None if validate else 1,
            callbacks=[bench.KeepTrainingRandomness()] if keep else [],
        )  # fmt: skip
        trainer.fit(model, DataLoader(data, batch_size=2), DataLoader(data, batch_size=8) if validate else None)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    plain = train(validate=False, keep=True)
    assert torch.equal(train(validate=True, keep=True), plain)
    assert not torch.equal(train(validate=True, keep=False), plain)  # what the callback prevents


def test_the_teacher_cache_gives_the_live_teachers_losses_and_is_reused(bench, setup, tmp_path, capsys):
    data, teacher = setup
    extra = ("--student", "2layer", "--seeds", "1", "--steps", "3", "--log-every", "1", "--train-limit", "8")
    live = bench.main(args(data, teacher, tmp_path, *extra, "--no-teacher-cache"))
    live_log = capsys.readouterr().out
    cached = bench.main(args(data, teacher, tmp_path, *extra, "--teacher-cache"))
    cached_log = capsys.readouterr().out
    assert live["settings"]["kd"]["teacher_cache"] is None
    meta = cached["settings"]["kd"]["teacher_cache"]
    assert meta["reused"] is False and meta["rows"] == KD_TRAIN_SIZE  # 8 labelled + the rest as transfer rows
    assert Path(meta["path"]).parent == tmp_path / "ft" and (Path(meta["path"]) / "hidden_6.npy").is_file()

    def kd_losses(log: str) -> list[str]:
        return [line.split(" loss ")[1].split()[0] for line in log.splitlines() if "student kd] step" in line]

    assert len(kd_losses(live_log)) == 3 and kd_losses(cached_log) == kd_losses(live_log)  # 4 decimals
    assert cached["student_acc_kd"] == live["student_acc_kd"]
    again = bench.main(args(data, teacher, tmp_path, *extra, "--teacher-cache"))
    assert again["settings"]["kd"]["teacher_cache"]["reused"] is True
    assert again["student_acc_kd_seeds"] == cached["student_acc_kd_seeds"]


def test_fused_optimizer_and_teacher_cache_defaults_per_student(bench):
    """The 2-layer student trains with the fused AdamW and the teacher cache by default; the others do not."""
    for student, on in (("2layer", True), ("small", False), ("bigru", False)):
        a = bench.parse_args(["--data-dir", "d", "--student", student])
        assert (a.fused_optimizer, a.teacher_cache) == (on, on)
    optimizer, _ = bench.optimizer_and_schedule(1e-3, 10, 0.1, fused=True)
    assert optimizer([torch.nn.Parameter(torch.zeros(2))]).defaults["fused"] is True
    # The cache holds no attention maps: an attention match runs the teacher live, and asking for both is refused.
    a = bench.parse_args(["--data-dir", "d", "--student", "2layer", "--attention-weight", "1"])
    assert a.teacher_cache is False
    with pytest.raises(SystemExit):
        bench.parse_args(["--data-dir", "d", "--student", "2layer", "--attention-weight", "1", "--teacher-cache"])


def test_fused_adamw_gives_the_multi_tensor_update_up_to_rounding(bench):
    def train(fused: bool) -> list[torch.Tensor]:
        start = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
        params = [torch.nn.Parameter(start), torch.nn.Parameter(torch.zeros(8))]
        optimizer = bench.optimizer_and_schedule(1e-2, 10, 0.1, fused=fused)[0](params)
        grads = torch.Generator().manual_seed(1)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            optimizer.step()
        return [p.detach() for p in params]

    fused, plain = train(True), train(False)
    for f, p in zip(fused, plain):
        torch.testing.assert_close(f, p, rtol=0, atol=1e-6)
    assert (plain[0] - torch.randn(50, 8, generator=torch.Generator().manual_seed(0))).abs().max() > 0.05  # it trained
