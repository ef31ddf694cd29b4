"""Distiller: shape checks that ask only what a term reads (pkd's first token, logits only for the KD term), errors
about projections that are set, configured-versus-scheduled weights, a teacher's own ``logits_mask``, projection
initialisation and per-projection optimizer options."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import BertConfig, BertModel

from lit_kd import DistillationCallback, DistillationConfig, DistillationModule, Distiller, IntermediateMatch
from lit_kd.adaptors import ModelView
from tests.kd_user_project import TEACHER_INPUTS, MyModule, UserData, tiny_teacher, user_adaptor

B, L_, C = 3, 5, 4


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def view(hidden: list[Tensor], logits: Tensor | None = None, **kw) -> ModelView:
    return ModelView(logits=torch.zeros(B, C) if logits is None else logits, hidden_states=hidden, **kw)


# ---------------------------------------------------------------------------------------------------- pkd
def test_pkd_reads_the_first_token_so_teacher_and_student_lengths_may_differ():
    h_s, h_t = randn(B, L_, 8, seed=0), randn(B, L_ + 3, 16, seed=1)  # e.g. other tokenizers
    match = IntermediateMatch(layer_t=0, layer_s=0, loss="pkd", projection=("linear", 8, 16), name="p")
    d = Distiller(None, DistillationConfig(kd_loss_weight=0.0, intermediate_matches=[match]))
    got = d.loss_terms(view([h_s]), [view([h_t])], progress=0.0)["match/p"][0]
    u_s = F.normalize(d.projections["p"](h_s[:, 0]), dim=-1)  # the projection of the first token only
    u_t = F.normalize(h_t[:, 0], dim=-1)
    torch.testing.assert_close(got, ((u_s - u_t) ** 2).sum(-1).mean())


def test_a_set_projection_with_wrong_widths_is_named_not_asked_for():
    match = IntermediateMatch(layer_t=0, layer_s=0, loss="pkd", projection=("linear", 8, 16), name="p")
    d = Distiller(None, DistillationConfig(kd_loss_weight=0.0, intermediate_matches=[match]))
    with pytest.raises(ValueError) as error:
        d.loss_terms(view([randn(B, L_, 8, seed=0)]), [view([randn(B, L_, 12, seed=1)])], progress=0.0)
    message = str(error.value)
    assert message == (
        "Expected the teacher's features of match `p` to have width dim_t=16 (its projection=('linear', 8, 16)) but "
        "got shape (3, 5, 12); fix the projection's widths."
    )
    assert "add a projection" not in message
    d.checked_first_batch = True  # the student's side, past the first-batch checks
    with pytest.raises(ValueError, match=r"student's features of match `p` to have width dim_s=8 .* \(3, 5, 6\)"):
        d.loss_terms(view([randn(B, L_, 6, seed=0)]), [view([randn(B, L_, 16, seed=1)])], progress=0.0)


# ------------------------------------------------------------------------------------------- logits and weights
def test_matches_only_do_not_compare_the_logits():
    match = IntermediateMatch(layer_t=0, layer_s=0, projection=("linear", 8, 16), name="h")
    config = DistillationConfig(kd_loss_weight=0.0, intermediate_matches=[match])
    s, t = (
        view([randn(B, L_, 8, seed=0)], logits=randn(B, 8, seed=2)),
        view([randn(B, L_, 16, seed=1)], randn(B, 16, seed=3)),
    )
    assert set(Distiller(None, config).loss_terms(s, [t], progress=0.0)) == {"match/h"}
    config = DistillationConfig(intermediate_matches=[match])  # the KD term reads the logits: refused
    with pytest.raises(ValueError, match=r"logits to have the same shape but got \(3, 16\) .* and \(3, 8\)"):
        Distiller(None, config).loss_terms(s, [t], progress=0.0)


def headless_bert(width: int, layers: int, seed: int) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=16,
    )
    return BertModel(config)


def encoder_adaptor(batch: dict[str, Tensor], outputs) -> ModelView:
    """A headless encoder: its [CLS] vector stands in for logits (unused: no KD term)."""
    return ModelView(
        logits=outputs.last_hidden_state[:, 0],
        hidden_states=outputs.hidden_states,
        input_mask=batch["attention_mask"],
    )


def test_distilling_matches_only_between_headless_encoders_fits(tmp_path):
    teacher, student = headless_bert(16, 2, seed=0), headless_bert(8, 1, seed=1)
    config = DistillationConfig(
        kd_loss_weight=0.0,
        intermediate_matches=[IntermediateMatch(layer_t=2, layer_s=1, projection=("linear", 8, 16), name="last")],
    )
    module = DistillationModule(
        teacher, student, config, teacher_adaptor=encoder_adaptor, student_adaptor=encoder_adaptor, num_labels=2
    )
    g = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(1, 30, (B, L_), generator=g), "attention_mask": torch.ones(B, L_, dtype=torch.long)}
        for _ in range(2)
    ]
    before = [p.clone() for p in student.parameters()]
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_only_a_config_whose_configured_weights_are_all_zero_is_refused():
    s, t = ModelView(logits=randn(B, C, seed=0)), ModelView(logits=randn(B, C, seed=1))
    growth = DistillationConfig(kd_loss_weight_scheduler="linear_growth")  # 0 at step 0, 1 at the end
    terms = Distiller(None, growth).loss_terms(s, [t], progress=0.0)
    assert terms["kd"][1] == 0.0 and terms["kd"][0] > 0  # computed, weighted 0
    with pytest.raises(ValueError, match=r"at least one loss term with a positive weight \(`kd_loss_weight`"):
        Distiller(None, DistillationConfig(kd_loss_weight=0.0)).loss_terms(s, [t], progress=0.5)


# ------------------------------------------------------------------------------------------ a teacher's own mask
def test_a_teacher_logits_mask_of_its_own_selects_its_positions():
    zs, zt = randn(2, 4, C, seed=4), randn(2, 6, C, seed=5)
    mask_s = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).bool()
    mask_t = torch.tensor([[0, 1, 0, 1, 0, 0], [1, 0, 1, 0, 1, 0]]).bool()
    config = DistillationConfig(temperature=2.0)
    terms = Distiller(None, config).loss_terms(
        ModelView(logits=zs, logits_mask=mask_s), [ModelView(logits=zt, logits_mask=mask_t)], progress=0.0
    )
    p_t = F.softmax(zt[mask_t] / 2, -1)  # (5, C), paired in order with the student's (5, C)
    expected = 4 * -(p_t * F.log_softmax(zs[mask_s] / 2, -1)).sum(-1).mean()
    torch.testing.assert_close(terms["kd"][0], expected)
    fewer = torch.tensor([[0, 1, 0, 1, 0, 0], [1, 0, 1, 0, 0, 0]]).bool()  # 4 positions, the student has 5
    with pytest.raises(
        ValueError, match=r"teacher's `logits_mask` to select as many positions .* \(4, 4\) .* \(5, 4\)"
    ):
        Distiller(None, config).loss_terms(
            ModelView(logits=zs, logits_mask=mask_s), [ModelView(logits=zt, logits_mask=fewer)], progress=0.0
        )
    # the same mask object (one adaptor for both models, e.g. lit_kt's): the usual masked mean, nothing selected
    same = Distiller(None, config).loss_terms(
        ModelView(logits=zs, logits_mask=mask_s), [ModelView(logits=zt[:, :4], logits_mask=mask_s)], progress=0.0
    )
    p_t = F.softmax(zt[:, :4][mask_s] / 2, -1)
    torch.testing.assert_close(same["kd"][0], 4 * -(p_t * F.log_softmax(zs[mask_s] / 2, -1)).sum(-1).mean())


# ------------------------------------------------------------------------------------------------ projections
def test_projection_init_textbrewer_is_normal_0_02_with_zero_bias():
    match = IntermediateMatch(layer_t=0, layer_s=0, projection=("relu", 64, 256), name="p")
    torch.manual_seed(0)
    linear = Distiller(None, DistillationConfig(intermediate_matches=[match], projection_init="textbrewer")).projections
    weight, bias = linear["p"][0].weight, linear["p"][0].bias
    assert weight.std().item() == pytest.approx(0.02, rel=0.05) and abs(weight.mean().item()) < 2e-3
    assert torch.equal(bias, torch.zeros(256))
    default = Distiller(None, DistillationConfig(intermediate_matches=[match])).projections["p"][0]
    bound = 1 / 64**0.5  # nn.Linear: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights and biases
    assert default.weight.abs().max() <= bound and default.bias.abs().max() > 0


def options_config() -> DistillationConfig:
    return DistillationConfig(
        intermediate_matches=[
            IntermediateMatch("bert.encoder.layer.1", "encoder", projection=("linear", 8, 16), name="own",
                              projection_options={"lr": 0.3, "weight_decay": 0.0}),
            IntermediateMatch("bert.encoder.layer.0", "encoder", projection=("linear", 8, 16), name="shared"),
        ]
    )  # fmt: skip


def test_projection_options_give_a_projection_its_own_parameter_group(tmp_path):
    from tests.kd_user_project import TinyEncoder

    module = DistillationModule(
        tiny_teacher(), TinyEncoder(), options_config(), projection_lr=0.1, teacher_inputs=TEACHER_INPUTS, num_labels=3
    )
    groups = module.configure_optimizers().param_groups
    assert [len(g["params"]) for g in groups[1:]] == [2, 2]
    assert (groups[1]["lr"], groups[2]["lr"], groups[2]["weight_decay"]) == (0.1, 0.3, 0.0)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.projections["shared"].parameters()}
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in module.projections["own"].parameters()}
    # the callback adds the same groups to the user's optimizer
    callback = DistillationCallback(tiny_teacher(), options_config(), student_module="net", projection_lr=0.2,
                                    teacher_inputs=TEACHER_INPUTS, student_adaptor=user_adaptor)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(MyModule(), UserData(n=8))  # one step of two: the epoch-wise StepLR does not step
    assert [g["lr"] for g in trainer.optimizers[0].param_groups][1:] == [0.2, 0.3]
