"""TextBrewer parity: the same tensors into TextBrewer 0.2.1's own code and into lit_kd configured as
``docs/distillation.md`` ("From TextBrewer") says, equal to 1e-6.

TextBrewer is the reference: its loss functions (``textbrewer.losses``), temperature and weight schedulers, its
``probability_shift_``, its projections, ``GeneralDistiller.compute_loss`` (several logits, separate teacher
``logits_mask``), ``GeneralDistiller.train_on_batch`` and ``train(num_steps=...)`` on tiny random BERTs, and
``MultiTeacherDistiller.train_on_batch``. Where lit_kd differs by design, the test shows the difference is real and
that the documented setting removes it.

Needs ``pip install --no-deps textbrewer==0.2.1.post1 && pip install tensorboardX packaging protobuf`` (CI installs it).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from lit_kd import DistillationConfig, DistillationModule, Distiller, IntermediateMatch, ModelView, losses, schedulers
from lit_kd.losses import shift_probability
from tests.conftest import cpu_trainer

textbrewer = pytest.importorskip(
    "textbrewer",
    reason="TextBrewer is not installed: pip install --no-deps textbrewer==0.2.1.post1 && pip install tensorboardX "
    "packaging protobuf",
)
tb = textbrewer.losses  # TextBrewer's loss functions
tb_schedulers = textbrewer.schedulers
post_adaptor = textbrewer.distiller_utils.post_adaptor
probability_shift_ = textbrewer.distiller_utils.probability_shift_
select_logits_with_mask = textbrewer.distiller_utils.select_logits_with_mask
PROJ_MAP = textbrewer.presets.PROJ_MAP
# training_step is called without a Trainer to compare single steps: its `self.log` calls warn and do nothing
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

TOL = dict(rtol=1e-6, atol=1e-6)
B, L_, C, D = 4, 6, 5, 8
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])  # (B, L)


def randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def tb_distiller(tmp_path: Path, **distill_config) -> textbrewer.GeneralDistiller:
    """A GeneralDistiller whose ``compute_loss`` we call on adaptor outputs (its models are never run)."""
    train_config = textbrewer.TrainingConfig(device="cpu", output_dir=str(tmp_path / "textbrewer"), log_dir=None)
    config = textbrewer.DistillationConfig(**distill_config)
    return textbrewer.GeneralDistiller(train_config, config, nn.Identity(), nn.Identity(), None, None)


def tb_total(distiller, results_s: dict, results_t: dict) -> Tensor:
    return distiller.compute_loss(post_adaptor(dict(results_s)), post_adaptor(dict(results_t)))[0]


def our_total(config: DistillationConfig, s_view: ModelView, t_views: list[ModelView], progress: float = 0.0):
    terms = Distiller(None, config).loss_terms(s_view, t_views, progress)
    return sum(value * weight for value, weight in terms.values())


# ------------------------------------------------------------------------------------------------------ logits (KD)
def logits_case(shape: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Student and teacher logits, a logits mask (or None) and labels; several shapes TextBrewer handles."""
    if shape == "sequence":  # (N, C)
        return randn(B, C, seed=1, scale=2), randn(B, C, seed=2, scale=3), None, torch.tensor([0, 1, 4, 2])
    labels = torch.randint(0, C, (B, L_), generator=torch.Generator().manual_seed(3))
    mask = MASK.bool() if shape == "tokens_masked" else None
    return randn(B, L_, C, seed=4, scale=2), randn(B, L_, C, seed=5, scale=3), mask, labels


@pytest.mark.parametrize("kd_loss_type", ["ce", "mse"])
@pytest.mark.parametrize("temperature_scheduler", ["constant", "flsw", "cwsm"])
@pytest.mark.parametrize("shape", ["sequence", "tokens", "tokens_masked"])
def test_kd_loss_and_temperature_schedules_equal_textbrewer(tmp_path, kd_loss_type, temperature_scheduler, shape):
    zs, zt, mask, _ = logits_case(shape)
    tb_scheduler = {"constant": "none", "flsw": ["flsw", 0.5, 2.0], "cwsm": ["cwsm", 0.7]}[temperature_scheduler]
    distiller = tb_distiller(
        tmp_path, temperature=3.0, temperature_scheduler=tb_scheduler, kd_loss_type=kd_loss_type, kd_loss_weight=0.7
    )
    masks = {} if mask is None else {"logits_mask": mask}  # TextBrewer's two adaptors both give the mask
    expected = tb_total(distiller, {"logits": zs, **masks}, {"logits": zt, **masks})
    config = DistillationConfig(
        temperature=3.0,
        temperature_scheduler=temperature_scheduler,
        flsw_beta=0.5,
        flsw_gamma=2.0,
        flsw_eps=1e-4,  # TextBrewer's normalisation z / (|z| + 1e-4)
        cwsm_beta=0.7,
        kd_loss_type=kd_loss_type,
        kd_loss_weight=0.7,
        scale_by_temperature_squared=False,  # TextBrewer does not scale by T**2
    )
    got = our_total(config, ModelView(logits=zs, logits_mask=mask), [ModelView(logits=zt)])
    torch.testing.assert_close(got, expected, **TOL)

    # The functions themselves: TextBrewer's scheduler and loss on the selected positions, ours with the mask.
    zs_sel, zt_sel = (zs, zt) if mask is None else (zs[mask], zt[mask])
    tb_fn = {"constant": tb_schedulers.constant_temperature_scheduler}.get(temperature_scheduler)
    if tb_fn is None:
        builder = getattr(tb_schedulers, f"{temperature_scheduler}_temperature_scheduler_builder")
        tb_fn = builder(*tb_scheduler[1:])
    tb_t = tb_fn(zs_sel, zt_sel, 3.0)
    ours_t = config.temperature_fn()(zs, zt, 3.0, mask=mask)  # (N,) or (B, L)
    ours_t_sel = ours_t if mask is None else ours_t[mask]
    torch.testing.assert_close(ours_t_sel, torch.as_tensor(tb_t, dtype=torch.float32).expand_as(ours_t_sel), **TOL)
    tb_loss = {"ce": tb.kd_ce_loss, "mse": tb.kd_mse_loss}[kd_loss_type]
    ours_loss = {"ce": losses.kd_ce, "mse": losses.kd_mse}[kd_loss_type]
    torch.testing.assert_close(ours_loss(zs, zt, ours_t, mask), tb_loss(zs_sel, zt_sel, tb_t), **TOL)


def test_flsw_default_normalisation_differs_from_textbrewer_and_flsw_eps_removes_it():
    zs, zt = randn(64, C, seed=6, scale=0.01), randn(64, C, seed=7, scale=0.01)  # small logits: eps matters
    tb_t = tb_schedulers.flsw_temperature_scheduler_builder(1.0, 2.0)(zs, zt, 4.0)
    exact = schedulers.flsw_temperature(zs, zt, 4.0, beta=1.0, gamma=2.0)
    assert (exact - tb_t).abs().max() > 1e-4
    torch.testing.assert_close(schedulers.flsw_temperature(zs, zt, 4.0, beta=1.0, gamma=2.0, eps=1e-4), tb_t, **TOL)
    zero = torch.zeros(2, C)  # an all-zero row: finite in both
    torch.testing.assert_close(
        schedulers.flsw_temperature(zero, zt[:2], 4.0, 1.0, 2.0, eps=1e-4),
        tb_schedulers.flsw_temperature_scheduler_builder(1.0, 2.0)(zero, zt[:2], 4.0),
        **TOL,
    )


@pytest.mark.parametrize("shape", ["sequence", "tokens"])
def test_probability_shift_equals_textbrewer(tmp_path, shape):
    zs, zt, _, labels = logits_case(shape)
    if shape == "tokens":
        labels[0, 4:] = -100  # unlabelled positions: TextBrewer leaves every negative label alone
        labels[2, 3:] = -1
    torch.testing.assert_close(shift_probability(zt, labels), probability_shift_(zt.clone(), labels), rtol=0, atol=0)
    distiller = tb_distiller(tmp_path, temperature=2.0, probability_shift=True)
    expected = tb_total(distiller, {"logits": zs, "labels": labels}, {"logits": zt})
    config = DistillationConfig(temperature=2.0, probability_shift=True, scale_by_temperature_squared=False)
    got = our_total(config, ModelView(logits=zs, labels=labels), [ModelView(logits=zt)])
    torch.testing.assert_close(got, expected, **TOL)


def test_several_logits_per_adaptor_stacked_equal_textbrewer(tmp_path):
    """TextBrewer sums the KD loss over a list of logits (e.g. span start and end); lit_kd's view has one tensor:
    stack them into (B, K, C) and multiply ``kd_loss_weight`` by K (the KD loss is a mean over the K heads)."""
    starts_s, ends_s = randn(B, L_, seed=8, scale=2), randn(B, L_, seed=9, scale=2)  # (B, L) over positions
    starts_t, ends_t = randn(B, L_, seed=10, scale=2), randn(B, L_, seed=11, scale=2)
    distiller = tb_distiller(tmp_path, temperature=2.0, kd_loss_weight=0.6)
    expected = tb_total(distiller, {"logits": [starts_s, ends_s]}, {"logits": [starts_t, ends_t]})
    config = DistillationConfig(temperature=2.0, kd_loss_weight=2 * 0.6, scale_by_temperature_squared=False)
    s_view = ModelView(logits=torch.stack([starts_s, ends_s], dim=1))  # (B, 2, L)
    t_view = ModelView(logits=torch.stack([starts_t, ends_t], dim=1))
    torch.testing.assert_close(our_total(config, s_view, [t_view]), expected, **TOL)


def test_a_teacher_logits_mask_of_its_own_equals_textbrewer(tmp_path):
    """Different tokenizations: each model's positions are selected by its own ``logits_mask``, then paired."""
    zs, zt = randn(2, 6, C, seed=12, scale=2), randn(2, 8, C, seed=13, scale=2)
    mask_s = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()  # 5 positions
    mask_t = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]]).bool()  # 5 positions, elsewhere
    distiller = tb_distiller(tmp_path, temperature=2.0, temperature_scheduler=["flsw", 0.5, 1.0])
    expected = tb_total(distiller, {"logits": zs, "logits_mask": mask_s}, {"logits": zt, "logits_mask": mask_t})
    config = DistillationConfig(
        temperature=2.0,
        temperature_scheduler="flsw",
        flsw_beta=0.5,
        flsw_gamma=1.0,
        flsw_eps=1e-4,
        scale_by_temperature_squared=False,
    )
    got = our_total(config, ModelView(logits=zs, logits_mask=mask_s), [ModelView(logits=zt, logits_mask=mask_t)])
    torch.testing.assert_close(got, expected, **TOL)
    assert select_logits_with_mask([zt], [mask_t])[0].shape == (5, C)


# ---------------------------------------------------------------------------------------------- weight schedules
def test_weight_scheduler_functions_equal_textbrewer():
    for p in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert schedulers.linear_decay(p) == tb_schedulers.linear_decay_weight_scheduler(p)
        assert schedulers.linear_growth(p) == tb_schedulers.linear_growth_weight_scheduler(p)


@pytest.mark.parametrize("schedule", ["linear_decay", "linear_growth"])
def test_weight_schedule_mode_textbrewer_replays_textbrewers_updates(schedule):
    """TextBrewer's loop: the configured weight at step 0, then ``weight = schedule(step / total)`` after each optimizer
    step. ``weight_schedule_mode="textbrewer"`` gives that sequence; the default multiplies from step 0 on."""
    total, weight = 5, 2.0
    fn = textbrewer.presets.WEIGHT_SCHEDULER[schedule]
    expected, current = [], weight
    for step in range(total):  # what train_with_num_steps does around each step
        expected.append(current)
        current = fn((step + 1) / total)
    config = DistillationConfig(kd_loss_weight=weight, kd_loss_weight_scheduler=schedule)
    config.weight_schedule_mode = "textbrewer"
    assert [config.kd_loss_weight_at(step / total) for step in range(total)] == pytest.approx(expected, abs=1e-12)
    config.weight_schedule_mode = "multiply"
    assert [config.kd_loss_weight_at(step / total) for step in range(total)] != pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------------ match losses
def hidden(seed: int, width: int = D, length: int = L_) -> Tensor:
    return randn(B, length, width, seed=seed)


def attention(seed: int, kind: str, heads: int = 2) -> Tensor:
    """(B, H, L, L) maps: ``transformers``' probabilities (padded keys 0) or raw scores (BERT's additive -10000)."""
    scores = randn(B, heads, L_, L_, seed=seed, scale=2)
    padded_keys = ~MASK.bool()[:, None, None, :]
    if kind == "probs":
        return scores.masked_fill(padded_keys, torch.finfo(scores.dtype).min).softmax(-1)
    return scores.masked_fill(padded_keys, -10000.0)


# (TextBrewer loss, TextBrewer function, lit_kd IntermediateMatch settings, attention kind (None: hidden))
MATCH_CASES = [
    ("hidden_mse", tb.hid_mse_loss, dict(loss="hidden_mse"), None),
    ("cos", tb.cos_loss, dict(loss="cos"), None),
    ("pkd", tb.pkd_loss, dict(loss="pkd"), None),
    ("fsp", tb.fsp_loss, dict(loss="fsp"), None),
    ("gram", tb.fsp_loss, dict(loss="gram"), None),
    ("nst", tb.mmd_loss, dict(loss="nst", variant="textbrewer"), None),
    ("mmd", tb.mmd_loss, dict(loss="mmd", variant="textbrewer"), None),
    ("attention_mse", tb.att_mse_loss, dict(loss="attention_mse"), "probs"),
    ("attention_mse_sum", tb.att_mse_sum_loss, dict(loss="attention_mse_sum"), "probs"),
    ("attention_mse", tb.att_mse_loss, dict(loss="attention_mse", variant="textbrewer"), "scores"),
    ("attention_mse_sum", tb.att_mse_sum_loss, dict(loss="attention_mse_sum", variant="textbrewer"), "scores"),
    ("attention_ce", tb.att_ce_loss, dict(loss="attention_ce", variant="textbrewer"), "probs"),
    ("attention_ce", tb.att_ce_loss, dict(loss="attention_ce", variant="textbrewer"), "scores"),
    ("attention_ce_mean", tb.att_ce_mean_loss, dict(loss="attention_ce_mean", variant="textbrewer"), "probs"),
    ("attention_ce_mean", tb.att_ce_mean_loss, dict(loss="attention_ce_mean", variant="textbrewer"), "scores"),
]


def match_inputs(settings: dict, kind: str | None, student_width: int = D):
    """Student and teacher features as lit_kd's views hold them and as TextBrewer's function takes them."""
    if kind is not None:
        a_s, a_t = attention(20, kind), attention(21, kind)
        s = ModelView(logits=torch.zeros(B, C), attentions=[a_s], attention_scores=kind == "scores")
        t = ModelView(logits=torch.zeros(B, C), attentions=[a_t], attention_scores=kind == "scores")
        return s, t, a_s, a_t, dict(layer_t=0, layer_s=0, feature="attention")
    two = settings["loss"] in ("fsp", "gram", "nst", "mmd")
    width_t = 2 * D if settings["loss"] in ("nst", "mmd") else D  # nst/mmd take other widths without a projection
    h_s, h_t = [hidden(22, student_width), hidden(23, student_width)], [hidden(24, width_t), hidden(25, width_t)]
    s, t = (
        ModelView(logits=torch.zeros(B, C), hidden_states=h_s),
        ModelView(logits=torch.zeros(B, C), hidden_states=h_t),
    )
    layers = dict(layer_t=[0, 1], layer_s=[0, 1]) if two else dict(layer_t=1, layer_s=0)
    return s, t, (h_s if two else h_s[0]), (h_t if two else h_t[1]), layers


def our_match_loss(match: IntermediateMatch, s_view: ModelView, t_view: ModelView, mask: Tensor | None) -> Tensor:
    config = DistillationConfig(kd_loss_weight=0.0, intermediate_matches=[match])
    s_view = replace(s_view, input_mask=mask)
    terms = Distiller(None, config).loss_terms(s_view, [t_view], progress=0.0)
    return terms[f"match/{match.name}"][0]


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize(
    ("name", "tb_fn", "settings", "kind"),
    MATCH_CASES,
    ids=[f"{c[0]}-{c[2].get('variant', 'lit_kd')}-{c[3] or 'hidden'}" for c in MATCH_CASES],
)
def test_match_losses_equal_textbrewer(name, tb_fn, settings, kind, masked):
    s_view, t_view, tb_s, tb_t, layers = match_inputs(settings, kind)
    mask = MASK if masked else None
    expected = tb_fn(tb_s, tb_t, mask=mask)
    got = our_match_loss(IntermediateMatch(**layers, **settings), s_view, t_view, mask)
    torch.testing.assert_close(got, expected, **TOL)
    assert textbrewer.presets.MATCH_LOSS_MAP[name] is tb_fn  # the name maps to the same function in TextBrewer


def test_pkd_reads_the_first_token_of_other_lengths_as_textbrewer():
    h_s, h_t = hidden(26, length=5), hidden(27, length=9)
    torch.testing.assert_close(losses.pkd(h_s, h_t), tb.pkd_loss(h_s, h_t), **TOL)


def test_attention_mse_on_unmasked_scores_with_textbrewers_threshold():
    """TextBrewer zeroes every unmasked score <= -1e-3; lit_kd's ``score_threshold`` default is -1e3."""
    s_view, t_view, a_s, a_t, layers = match_inputs({}, "scores")
    settings = dict(**layers, loss="attention_mse")
    expected = tb.att_mse_loss(a_s, a_t)
    default = our_match_loss(IntermediateMatch(**settings), s_view, t_view, None)
    assert (default - expected).abs() > 1e-2
    got = our_match_loss(IntermediateMatch(**settings, score_threshold=-1e-3), s_view, t_view, None)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize(
    ("settings", "kind", "tb_fn"),
    [
        (dict(loss="attention_ce"), "probs", tb.att_ce_loss),  # TextBrewer softmaxes the probabilities again
        (dict(loss="attention_ce_mean"), "probs", tb.att_ce_mean_loss),
        (dict(loss="nst"), None, tb.mmd_loss),  # TextBrewer divides by the length under a mask
        (dict(loss="attention_mse", score_threshold=-1e-3), "scores", tb.att_mse_loss),  # no threshold with a mask
    ],
    ids=["attention_ce", "attention_ce_mean", "nst", "attention_mse_scores"],
)
def test_documented_differences_are_real_without_the_textbrewer_variant(settings, kind, tb_fn):
    s_view, t_view, tb_s, tb_t, layers = match_inputs(settings, kind)
    expected = tb_fn(tb_s, tb_t, mask=MASK)
    ours = our_match_loss(IntermediateMatch(**layers, **settings), s_view, t_view, MASK)
    assert (ours - expected).abs() > 1e-3
    settings = {k: v for k, v in settings.items() if k != "score_threshold"}
    tb_variant = our_match_loss(IntermediateMatch(**layers, **settings, variant="textbrewer"), s_view, t_view, MASK)
    torch.testing.assert_close(tb_variant, expected, **TOL)


@pytest.mark.parametrize("name", ["hidden_mse", "cos", "pkd", "attention_mse", "attention_ce"])
def test_textbrewer_match_functions_plug_in_as_user_losses(name):
    """TextBrewer's one-layer match functions fit ``fn(feature_s, feature_t, mask)``: a dotted path to one is a user
    loss (``loss: textbrewer.losses.att_ce_loss``) that gives TextBrewer's value by construction."""
    fn = textbrewer.presets.MATCH_LOSS_MAP[name]
    kind = "probs" if name.startswith("attention") else None
    s_view, t_view, tb_s, tb_t, layers = match_inputs({"loss": name}, kind)
    path = f"textbrewer.losses.{fn.__name__}"
    got = our_match_loss(IntermediateMatch(**layers, loss=path), s_view, t_view, MASK)
    torch.testing.assert_close(got, fn(tb_s, tb_t, mask=MASK), **TOL)


def test_textbrewer_custom_matches_do_not_run_in_0_2_1(tmp_path):
    """TextBrewer's ``custom_matches`` (matches between modules) fail at the first step of 0.2.1 (a misspelt key), so
    there is no value to compare; lit_kd's counterpart is a match naming the modules by dotted path
    (``IntermediateMatch(layer_t="bert.encoder.layer.1", layer_s="bert.encoder.layer.0")``, tested in
    ``test_kd_callback.py``)."""
    teacher, student = tiny_bert(TEACHER_WIDTH, 2, seed=0), tiny_bert(STUDENT_WIDTH, 1, seed=1)
    train_config = textbrewer.TrainingConfig(device="cpu", output_dir=str(tmp_path / "textbrewer"), log_dir=None)
    match = textbrewer.distiller_utils.CustomMatch(
        teacher.bert.encoder.layer[1], student.bert.encoder.layer[0], 1.0, lambda s, t, mask_s, mask_t: s[0].mean()
    )
    distiller = textbrewer.GeneralDistiller(
        train_config, textbrewer.DistillationConfig(), teacher, student, tb_adaptor, tb_adaptor, custom_matches=[match]
    )
    with pytest.raises(KeyError, match="match_weghts"):
        distiller.train_on_batch(bert_batches(1)[0], ARGS)


# ---------------------------------------------------------------------------------------------------- projections
@pytest.mark.parametrize("kind", ["linear", "relu", "tanh"])
def test_projection_init_textbrewer_draws_textbrewers_weights(kind):
    match = IntermediateMatch(layer_t=1, layer_s=0, projection=(kind, D, 2 * D), name="p")
    torch.manual_seed(7)
    ours = Distiller(None, DistillationConfig(intermediate_matches=[match], projection_init="textbrewer"))
    torch.manual_seed(7)
    theirs = PROJ_MAP[kind](D, 2 * D)
    linear = theirs if isinstance(theirs, nn.Linear) else theirs[0]
    torch.testing.assert_close(ours.projections["p"][0].weight, linear.weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.projections["p"][0].bias, torch.zeros(2 * D), rtol=0, atol=0)
    x = randn(3, D, seed=28)
    torch.testing.assert_close(ours.projections["p"](x), theirs(x), rtol=0, atol=0)
    torch.manual_seed(7)
    default = Distiller(None, DistillationConfig(intermediate_matches=[match]))
    assert default.projections["p"][0].weight.std() > 0.05  # nn.Linear's uniform(±1/sqrt(8)): not TextBrewer's


# ---------------------------------------------------------------------------------------------- whole distillers
TEACHER_WIDTH, STUDENT_WIDTH, VOCAB, LABELS = 32, 16, 50, 3


def tiny_bert(width: int, layers: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=16,
        num_labels=LABELS,
        hidden_dropout_prob=0.0,  # both libraries see the same forward
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config)


def bert_batches(n: int, seed: int = 0) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (B, L_), generator=g) * MASK
        out.append({"input_ids": ids, "attention_mask": MASK.clone(), "labels": torch.randint(0, 3, (B,), generator=g)})
    return out


def tb_adaptor(batch, outputs):
    return {
        "logits": outputs.logits,
        "hidden": outputs.hidden_states,
        "attention": outputs.attentions,
        "inputs_mask": batch["attention_mask"],
        "losses": outputs.loss,
        "labels": batch["labels"],
    }


ARGS = {"output_hidden_states": True, "output_attentions": True}  # what TextBrewer's users pass to the models

HIDDEN_TB = {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 0.5}
HIDDEN_OURS = dict(layer_t=2, layer_s=1, loss="hidden_mse", weight=0.5)
PROJECTION = ("linear", STUDENT_WIDTH, TEACHER_WIDTH)

# (TextBrewer's intermediate_matches, lit_kd's, extra arguments of TextBrewer's and of lit_kd's DistillationConfig)
GENERAL_CASES = {
    "hidden_attention_mse": (
        [
            {**HIDDEN_TB, "proj": list(PROJECTION)},
            {"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_mse", "weight": 2.0},
        ],
        [
            IntermediateMatch(**HIDDEN_OURS, projection=PROJECTION),
            IntermediateMatch(1, 0, feature="attention", loss="attention_mse", weight=2.0),
        ],
        {},
        {},
    ),
    "gram_attention_ce_flsw_shift": (
        [
            {"layer_T": [0, 2], "layer_S": [0, 1], "feature": "hidden", "loss": "gram", "weight": 3.0,
             "proj": ["tanh", STUDENT_WIDTH, TEACHER_WIDTH]},
            {"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_ce", "weight": 0.3},
        ],
        [
            IntermediateMatch([0, 2], [0, 1], loss="gram", weight=3.0, projection=("tanh", *PROJECTION[1:])),
            IntermediateMatch(1, 0, feature="attention", loss="attention_ce", weight=0.3, variant="textbrewer"),
        ],
        # beta * 2**gamma < temperature: TextBrewer's temperatures stay > 0 (lit_kd's are floored at 0.01)
        {"temperature_scheduler": ["flsw", 0.4, 2.0], "probability_shift": True},
        {"temperature_scheduler": "flsw", "flsw_beta": 0.4, "flsw_gamma": 2.0, "flsw_eps": 1e-4,
         "probability_shift": True},
    ),
}  # fmt: skip


def first_linear(projection: nn.Module) -> nn.Linear:
    return projection if isinstance(projection, nn.Linear) else projection[0]


def general_pair(
    tmp_path: Path,
    tb_matches: list,
    our_matches: list,
    tb_extra: dict,
    our_extra: dict,
    accumulation: int = 1,
    **module_kwargs,
):
    """TextBrewer's GeneralDistiller and our DistillationModule on the same tiny BERTs (two students with the same
    weights), the projections drawn alike (``projection_init="textbrewer"`` under the same seed)."""
    teacher, student = tiny_bert(TEACHER_WIDTH, 2, seed=0), tiny_bert(STUDENT_WIDTH, 1, seed=1)
    tb_student = tiny_bert(STUDENT_WIDTH, 1, seed=1)
    train_config = textbrewer.TrainingConfig(
        device="cpu",
        output_dir=str(tmp_path / "textbrewer"),
        log_dir=None,
        ckpt_steps=1000,
        gradient_accumulation_steps=accumulation,
    )
    tb_config = textbrewer.DistillationConfig(
        temperature=2.0, hard_label_weight=0.4, intermediate_matches=tb_matches, **tb_extra
    )
    torch.manual_seed(11)
    distiller = textbrewer.GeneralDistiller(train_config, tb_config, teacher, tb_student, tb_adaptor, tb_adaptor)
    config = DistillationConfig(
        temperature=2.0,
        hard_label_weight=0.4,
        scale_by_temperature_squared=False,  # TextBrewer does not scale by T**2
        intermediate_matches=our_matches,
        projection_init="textbrewer",
        **our_extra,
    )
    torch.manual_seed(11)
    module = DistillationModule(teacher, student, config, optimizer=partial(torch.optim.SGD, lr=0.5), **module_kwargs)
    for match, projection in zip(our_matches, distiller.projs, strict=True):
        if match.projection is not None:
            ours = module.projections[match.name][0].weight
            torch.testing.assert_close(ours, first_linear(projection).weight, rtol=0, atol=0)
    return distiller, tb_student, module


@pytest.mark.parametrize("case", sorted(GENERAL_CASES))
def test_general_distiller_train_on_batch_equals_training_step(tmp_path, case):
    distiller, _, module = general_pair(tmp_path, *GENERAL_CASES[case])
    for batch in bert_batches(2):
        expected, _ = distiller.train_on_batch(batch, ARGS)
        torch.testing.assert_close(module.training_step(batch, 0), expected, **TOL)


SCHEDULES = {"kd_loss_weight_scheduler": "linear_decay", "hard_label_weight_scheduler": "linear_growth"}


def test_textbrewer_training_loop_equals_a_lightning_fit(tmp_path):
    """Four SGD steps of TextBrewer's ``train(num_steps=4)`` and of ``Trainer.fit(max_steps=4)``: linear-decay KD
    weight and linear-growth hard-label weight (``weight_schedule_mode="textbrewer"``: replaced after each step), a
    projection with its own learning rate (TextBrewer's ``proj[3]``, our ``projection_options``), flsw temperatures and
    probability shift: the students and projections end equal."""
    steps = 4
    tb_matches, our_matches, tb_extra, our_extra = GENERAL_CASES["gram_attention_ce_flsw_shift"]
    tb_matches = [{**HIDDEN_TB, "proj": [*PROJECTION, {"lr": 0.05}]}, tb_matches[1]]
    our_matches = [
        IntermediateMatch(**HIDDEN_OURS, projection=PROJECTION, projection_options={"lr": 0.05}),
        our_matches[1],
    ]
    distiller, tb_student, module = general_pair(
        tmp_path,
        tb_matches,
        our_matches,
        {**tb_extra, **SCHEDULES},
        {**our_extra, **SCHEDULES, "weight_schedule_mode": "textbrewer"},
    )
    batches = bert_batches(steps, seed=1)
    distiller.train(torch.optim.SGD(tb_student.parameters(), lr=0.5), batches, num_steps=steps, **ARGS)
    trainer = fit(module, batches, tmp_path, max_steps=steps)
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [0.5, 0.05]
    assert_same_parameters(module.student, tb_student)
    torch.testing.assert_close(module.projections[our_matches[0].name][0].weight, distiller.projs[0].weight, **TOL)
    assert distiller.d_config.kd_loss_weight == pytest.approx(0.0)  # TextBrewer's weight after its last step


def test_accumulation_clipping_and_lr_schedule_equal_textbrewers_loop(tmp_path):
    """``gradient_accumulation_steps``/``accumulate_grad_batches``, ``max_grad_norm``/``gradient_clip_val`` (no
    projection: TextBrewer clips the student's gradients only, Lightning every parameter of the optimizer) and
    ``scheduler_class``/``lr_scheduler`` stepped per optimizer step, with TextBrewer's weight schedules."""
    steps, accumulation = 4, 2
    tb_matches = [{"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_mse", "weight": 5.0}]
    our_matches = [IntermediateMatch(1, 0, feature="attention", loss="attention_mse", weight=5.0)]
    step_lr = {"step_size": 1, "gamma": 0.5}
    distiller, tb_student, module = general_pair(
        tmp_path,
        tb_matches,
        our_matches,
        SCHEDULES,
        {**SCHEDULES, "weight_schedule_mode": "textbrewer"},
        accumulation=accumulation,
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, **step_lr),
    )
    batches = bert_batches(steps * accumulation, seed=2)
    distiller.train(
        torch.optim.SGD(tb_student.parameters(), lr=0.5),
        batches,
        num_steps=steps,
        max_grad_norm=0.05,
        scheduler_class=torch.optim.lr_scheduler.StepLR,
        scheduler_args=step_lr,
        **ARGS,
    )
    trainer = fit(
        module, batches, tmp_path, max_steps=steps, accumulate_grad_batches=accumulation, gradient_clip_val=0.05
    )
    assert trainer.global_step == steps and trainer.optimizers[0].param_groups[0]["lr"] == 0.5 * 0.5**steps
    assert_same_parameters(module.student, tb_student)


def fit(module: L.LightningModule, batches: list[dict], tmp_path: Path, **kw) -> L.Trainer:
    trainer = cpu_trainer(tmp_path, **kw)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def assert_same_parameters(ours: nn.Module, theirs: nn.Module) -> None:
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=name)


def test_multi_teacher_distiller_equals_training_step(tmp_path):
    teachers = [tiny_bert(TEACHER_WIDTH, 2, seed=0), tiny_bert(TEACHER_WIDTH, 1, seed=2)]
    student = tiny_bert(STUDENT_WIDTH, 1, seed=1)
    train_config = textbrewer.TrainingConfig(device="cpu", output_dir=str(tmp_path / "textbrewer"), log_dir=None)
    tb_config = textbrewer.DistillationConfig(
        temperature=3.0, temperature_scheduler=["cwsm", 2.0], hard_label_weight=0.5, probability_shift=True
    )
    distiller = textbrewer.MultiTeacherDistiller(train_config, tb_config, teachers, student, tb_adaptor, tb_adaptor)
    config = DistillationConfig(
        temperature=3.0,
        temperature_scheduler="cwsm",
        cwsm_beta=2.0,
        hard_label_weight=0.5,
        probability_shift=True,
        scale_by_temperature_squared=False,
    )
    module = DistillationModule(teachers, student, config, teacher_reduce="logits")  # TextBrewer averages logits
    for batch in bert_batches(2):
        expected, _ = distiller.train_on_batch(batch, {})
        torch.testing.assert_close(module.training_step(batch, 0), expected, **TOL)
