"""The language-model recipe: ``LanguageModelingDataModule``'s batches and splits, ``CausalLMModule``'s perplexity by
hand, ``lit-kd fit`` of configs/pretrain_lm_sst2.yaml then configs/distill_lm_sst2.yaml end to end (tiny models, a
tiny data folder, two steps each), and a mini run of scripts/bench_kd_lm.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from lit_kd import CausalLMModule, LanguageModelingDataModule
from lit_kd.lm_data import LengthGroupedBatchSampler, collate_lm
from lit_kd.lm_factories import gpt2_from_checkpoint, gpt2_lm

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a fine film with dull moments but a great cast and a moving story that never quite lands".split()


def write_sst2(folder: Path, n_train: int = 24, n_dev: int = 8) -> Path:
    """A folder in the SST-2 layout: ``sentence<TAB>label`` rows of 1 to 12 words."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, offset in (("train.tsv", n_train, 0), ("dev.tsv", n_dev, 7)):
        rows = [
            f"{' '.join(WORDS[(i + offset) % 5 : (i + offset) % 5 + 1 + (i * 5 + offset) % 12])}\t{i % 2}"
            for i in range(n)
        ]
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return folder


def tiny_gpt2(vocab_size: int = 50, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=vocab_size,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


# ------------------------------------------------------------------------------------------------ data
def test_batches_are_right_padded_with_labels_minus_100_exactly_at_the_padding(tmp_path):
    dm = LanguageModelingDataModule(str(write_sst2(tmp_path)), max_length=8, batch_size=6)
    dm.setup("fit")
    tok = dm.load_tokenizer()
    batches = list(dm.train_dataloader()) + list(dm.val_dataloader())
    assert sum(len(b["index"]) for b in batches) == 24 + 8
    lengths = set()
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels", "index"}  # no token_type_ids for a GPT-2
        pad = b["attention_mask"] == 0
        assert torch.equal(b["labels"] == -100, pad)
        assert torch.equal(b["labels"][~pad], b["input_ids"][~pad])
        assert bool((b["input_ids"][pad] == tok.pad_token_id).all())
        n = b["attention_mask"].sum(1)
        assert torch.equal(b["attention_mask"], (torch.arange(b["attention_mask"].shape[1]) < n[:, None]).long())
        assert bool((b["input_ids"][:, 0] == tok.cls_token_id).all())  # [CLS] ... [SEP]: begin and end of sentence
        assert int(n.max()) <= 8
        lengths.update(n.tolist())
    assert pad.any() or len(lengths) > 1
    assert 8 in lengths and min(lengths) < 8  # truncated rows and padded rows both occur


def test_carve_dev_holds_out_the_last_train_rows_as_validation_and_test(tmp_path):
    folder = write_sst2(tmp_path / "d", n_train=10)
    (folder / "dev.tsv").unlink()  # not read with carve_dev
    dm = LanguageModelingDataModule(str(folder), carve_dev=3, batch_size=4)
    rows = [line.split("\t")[0] for line in (folder / "train.tsv").read_text().splitlines()[1:]]
    assert dm.texts("train") == rows[:7] and dm.texts("val") == rows[7:] == dm.texts("test")
    dm.setup("fit")
    assert len(dm.dataset("train")) == 7 and len(dm.dataset("val")) == 3
    assert sum(len(b["index"]) for b in dm.test_dataloader()) == 3
    limited = LanguageModelingDataModule(str(folder), carve_dev=3, train_limit=5)
    assert limited.texts("train") == rows[:5] and limited.texts("val") == rows[7:]
    with pytest.raises(ValueError, match=r"carve_dev.*10 rows of .*train\.tsv"):
        LanguageModelingDataModule(str(folder), carve_dev=10).texts("train")
    with pytest.raises(FileNotFoundError, match=r"dev\.tsv"):
        LanguageModelingDataModule(str(folder)).texts("val")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_length": 1}, "max_length"),
        ({"batch_size": 0}, "batch_size"),
        ({"carve_dev": -1}, "carve_dev"),
        ({"train_limit": 0}, "train_limit"),
        ({"tokenizer": ""}, "tokenizer"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LanguageModelingDataModule(str(tmp_path), **kwargs)


def test_length_grouped_batches_use_every_index_once_and_pad_little():
    lengths = [(i * 7919) % 30 + 1 for i in range(200)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, pool=5, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 25 and sorted(i for b in batches for i in b) == list(range(200))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded < 1.2 * sum(lengths)  # random batches of 8 would pad to about 1.6x
    again = list(LengthGroupedBatchSampler(lengths, 8, 5, torch.Generator().manual_seed(0)))
    assert again == batches


# ------------------------------------------------------------------------------------------------ module
def test_length_grouped_batches_are_refused_under_several_processes(tmp_path):
    """The custom batch sampler is not sharded: under DDP every process would train on the same batches."""
    from types import SimpleNamespace

    dm = LanguageModelingDataModule(str(write_sst2(tmp_path)), max_length=8, batch_size=6, group_by_length=True)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="`group_by_length` to be False with several processes \\(world size 2\\)"):
        dm.train_dataloader()
    dm.trainer = SimpleNamespace(world_size=1)
    assert sum(len(b["index"]) for b in dm.train_dataloader()) == 24


def test_val_ppl_is_exp_of_the_mean_cross_entropy_over_real_shifted_tokens():
    model = tiny_gpt2().eval()
    module = CausalLMModule(model).eval()
    g = torch.Generator().manual_seed(0)
    items = [
        {"input_ids": torch.randint(0, 50, (n,), generator=g).tolist(), "index": i}
        for i, n in enumerate([3, 9, 5, 12, 2, 7])
    ]
    batches = [collate_lm(items[:3], pad_token_id=0), collate_lm(items[3:], pad_token_id=0)]
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            module.validation_step(b, 0)
        for item in items:  # each sentence alone, no padding at all
            ids = torch.tensor([item["input_ids"]])
            logits = model(input_ids=ids).logits[0]  # (n, V)
            nll += float(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
        got = module.val_metrics.compute()["val/ppl"]
        own = model(**{k: batches[1][k] for k in ("input_ids", "attention_mask")}, labels=batches[1]["labels"]).loss
        torch.testing.assert_close(module.loss(batches[1]), own, rtol=1e-5, atol=1e-6)  # transformers' own loss
    assert count == sum(n - 1 for n in [3, 9, 5, 12, 2, 7])
    assert math.isclose(got.item(), math.exp(nll / count), rel_tol=1e-4)


def test_gpt2_factories_and_a_missing_checkpoint(tmp_path):
    model = gpt2_lm(n_layer=1, n_embd=16, n_head=2, n_positions=16)
    assert model.config.vocab_size == 30522 and model.config.pad_token_id == 0 and model.training
    assert (model.config.bos_token_id, model.config.eos_token_id) == (101, 102)  # [CLS], [SEP]
    with pytest.raises(ValueError, match="n_head"):
        gpt2_lm(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="vocab_size"):
        gpt2_lm(vocab_size=100)
    missing = tmp_path / "nowhere" / "best.ckpt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        gpt2_from_checkpoint(str(missing))


# ------------------------------------------------------------------------------------------------ lit-kd fit
def test_pretrain_then_distill_configs_run_end_to_end(tmp_path, monkeypatch, capsys):
    from lit_kd.cli import main

    data = write_sst2(tmp_path / "sst2")
    monkeypatch.chdir(tmp_path)  # the configs write to runs/ and read the teacher from runs/ under the cwd
    common = [
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--data.init_args.data_dir",
        str(data),
        "--data.init_args.batch_size",
        "4",
    ]
    tiny = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2"]
    teacher = [f"--model.init_args.model.init_args.{w[2:]}" if w.startswith("--") else w for w in tiny]
    main(["fit", "--config", str(ROOT / "configs/pretrain_lm_sst2.yaml"), *common, *teacher])
    best = tmp_path / "runs/pretrain_lm_sst2/checkpoints/best.ckpt"
    assert best.is_file() and (tmp_path / "runs/pretrain_lm_sst2/checkpoints/last.ckpt").is_file()
    assert "test/ppl" in capsys.readouterr().out
    loaded = gpt2_from_checkpoint(str(best))  # the sizes come from the checkpoint
    assert loaded.config.n_embd == 16 and not loaded.training

    student = [f"--model.init_args.student.init_args.{w[2:]}" if w.startswith("--") else w for w in tiny]
    student[student.index("16")] = "8"
    main(["fit", "--config", str(ROOT / "configs/distill_lm_sst2.yaml"), *common, *student])
    out = capsys.readouterr().out
    assert "test/ppl" in out and "test/acc" in out
    ckpt = tmp_path / "runs/distill_lm_sst2/checkpoints/best.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and math.isfinite(
        float(state["callbacks"][next(iter(state["callbacks"]))]["best_model_score"])
    )
    weights = state["state_dict"]
    assert weights["student.transformer.wte.weight"].shape == (30522, 8)
    assert not any(k.startswith("teachers.") for k in weights)
    # the distilled student loads back as a GPT-2 (from `student.*`, sizes given since no config is stored)
    again = gpt2_from_checkpoint(str(ckpt), n_layer=1, n_embd=8, n_head=2, n_positions=32)
    torch.testing.assert_close(again.transformer.wte.weight, weights["student.transformer.wte.weight"])


# ------------------------------------------------------------------------------------------------ benchmark
def test_bench_kd_lm_mini_run_writes_the_figures(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    sys.modules.pop("bench_kd_lm", None)
    import bench_kd_lm

    data = write_sst2(tmp_path / "sst2", n_train=40)
    out = tmp_path / "bench.json"
    args = [
        "--data-dir",
        str(data),
        "--json",
        str(out),
        "--teacher-ckpt-dir",
        str(tmp_path / "teacher"),
        "--teacher-layers",
        "1",
        "--teacher-width",
        "16",
        "--teacher-heads",
        "2",
        "--student-width",
        "8",
        "--teacher-steps",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--timing-warmup",
        "0",
        "--seeds",
        "2",
        "--log-every",
        "1",
    ]
    result = bench_kd_lm.main(args)
    written = json.loads(out.read_text())
    keys = {"teacher_ppl", "student_ppl_no_kd", "student_ppl_kd", "steps", "kd_step_s", "student_step_s"}
    assert keys <= set(written) and written == result
    assert written["steps"] == 2 and written["same_batches"] and not written["teacher_reused"]
    assert all(math.isfinite(written[k]) and written[k] > 0 for k in keys)
    # Two student seeds under one teacher: the headline figures are their means.
    assert written["seeds"] == [42, 43] and len(written["student_ppl_kd_seeds"]) == 2
    for name in ("kd", "no_kd"):
        per_seed = written[f"student_ppl_{name}_seeds"]
        assert written[f"student_ppl_{name}"] == pytest.approx(sum(per_seed) / 2, abs=2e-3)
    reductions = [1 - kd / no for kd, no in zip(written["student_ppl_kd_seeds"], written["student_ppl_no_kd_seeds"])]
    assert written["kd_ppl_reduction"] == pytest.approx(sum(reductions) / 2, abs=1e-3)
    assert written["kd_ppl_reduction_se"] == pytest.approx(abs(reductions[0] - reductions[1]) / 2, abs=1e-3)
    with pytest.raises(ValueError, match="fingerprint"):  # another split is other training data: not this teacher
        bench_kd_lm.main([*args, "--carve-dev", "5"])
    carved = [*args[:-2], "--carve-dev", "5"]  # (without "--log-every 1")
    carved[carved.index("--teacher-ckpt-dir") + 1] = str(tmp_path / "teacher-carved")
    again = bench_kd_lm.main(carved)
    assert again["dev_sentences"] == 5 and again["train_sentences"] == 35 and not again["teacher_reused"]
    assert bench_kd_lm.main(carved)["teacher_reused"]
