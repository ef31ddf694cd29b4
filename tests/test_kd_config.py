"""lit_kd.config: validation messages, layer checks against the models, the name-to-function mappings."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from lit_kd import losses, schedulers
from lit_kd.config import (
    ATTENTION_LOSSES,
    HIDDEN_LOSSES,
    DistillationConfig,
    IntermediateMatch,
    MatchLoss,
    WeightScheduler,
)


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ IntermediateMatch
def test_intermediate_match_defaults_and_names():
    m = IntermediateMatch(layer_t=4, layer_s=2)
    assert (m.feature, m.loss, m.weight, m.projection, m.name) == (
        "hidden",
        "hidden_mse",
        1.0,
        None,
        "hidden_2_4_hidden_mse",
    )
    m = IntermediateMatch(layer_t=(0, 4), layer_s=[0, 2], loss="fsp", projection=["linear", 4, 8])
    assert (m.layer_t, m.name, m.projection, m.two_layers) == ([0, 4], "hidden_0-2_0-4_fsp", ("linear", 4, 8), True)
    assert IntermediateMatch(1, 1, feature="attention", loss="attention_ce", name="att").name == "att"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(feature="logits"),
            "Expected `feature` to be one of 'hidden', 'attention' but got 'logits'.",
        ),
        (
            dict(loss="l1"),
            "Expected `loss` to be one of 'hidden_mse', 'cos', 'pkd', 'fsp', 'gram', 'nst', 'mmd', 'attention_mse', "
            "'attention_mse_sum', 'attention_mse_mean', 'attention_ce', 'attention_ce_mean', a callable or a "
            "dotted import path (`mypkg.losses.fn`) but got 'l1'.",
        ),
        (
            dict(feature="attention", loss="hidden_mse"),
            "Expected `loss` to be one of 'attention_mse', 'attention_mse_sum', 'attention_mse_mean', 'attention_ce', "
            "'attention_ce_mean' for `feature='attention'` but got 'hidden_mse'.",
        ),
        (
            dict(loss="attention_mse"),
            "Expected `loss` to be one of 'hidden_mse', 'cos', 'pkd', 'fsp', 'gram', 'nst', 'mmd' for "
            "`feature='hidden'` but got 'attention_mse'.",
        ),
        (
            dict(layer_t=[1, 2]),
            "Expected `layer_t` to be a single layer index or a module's dotted name for `loss='hidden_mse'` but "
            "got [1, 2].",
        ),
        (
            dict(loss="nst"),
            "Expected `layer_t` to be a list of two layer indices for `loss='nst'` but got 3.",
        ),
        (
            dict(layer_t=[0, 3], layer_s=[0, 1, 2], loss="fsp"),
            "Expected `layer_s` to be a list of two layer indices for `loss='fsp'` but got [0, 1, 2].",
        ),
        (dict(layer_s=-1), "Expected `layer_s` to be >= 0 but got -1."),
        (
            dict(layer_s=True),
            "Expected `layer_s` to be a single layer index or a module's dotted name for `loss='hidden_mse'` but "
            "got True.",
        ),
        (dict(weight=-0.5), "Expected `weight` to be >= 0 but got -0.5."),
        (
            dict(projection=("conv", 4, 8)),
            "Expected `projection` to be (kind, dim_s, dim_t) with kind one of 'linear', 'relu', 'tanh' but got "
            "('conv', 4, 8).",
        ),
        (
            dict(projection=("relu", 0, 8)),
            "Expected the dimensions of `projection` to be positive integers but got ('relu', 0, 8).",
        ),
        (
            dict(feature="attention", loss="attention_mse", projection=("linear", 4, 8)),
            "Expected `projection` to be None for `feature='attention'` (attention maps have no feature dimension) "
            "but got ('linear', 4, 8).",
        ),
        (dict(name=""), "Expected `name` to be a non-empty string without '.' or None but got ''."),
    ],
)
def test_intermediate_match_validation_messages(kwargs, message):
    kwargs = {"layer_t": 3, "layer_s": 1, **kwargs}
    assert error(IntermediateMatch, **kwargs) == message


def test_every_match_loss_has_a_function_with_the_right_head_reduction():
    assert set(HIDDEN_LOSSES) | set(ATTENTION_LOSSES) == set(get_args(MatchLoss))
    torch.manual_seed(0)
    a_s, a_t = torch.randn(2, 3, 4, 4).softmax(-1), torch.randn(2, 3, 4, 4).softmax(-1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    for loss, reduce in (("attention_mse", "none"), ("attention_mse_sum", "sum"), ("attention_mse_mean", "mean")):
        fn = IntermediateMatch(1, 1, feature="attention", loss=loss).loss_fn()
        assert fn(a_s, a_t, mask) == losses.attention_mse(a_s, a_t, mask, head_reduce=reduce)
    for loss, reduce in (("attention_ce", "none"), ("attention_ce_mean", "mean")):
        fn = IntermediateMatch(1, 1, feature="attention", loss=loss).loss_fn()
        assert fn(a_s.log(), a_t.log(), mask, scores=True) == losses.attention_ce(
            a_s.log(), a_t.log(), mask, scores=True, head_reduce=reduce
        )
    h_s, h_t = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    for loss in ("hidden_mse", "cos"):
        assert IntermediateMatch(1, 1, loss=loss).loss_fn()(h_s, h_t, mask) == getattr(losses, loss)(h_s, h_t, mask)
    assert IntermediateMatch(1, 1, loss="pkd").loss_fn()(h_s, h_t, mask) == losses.pkd(h_s, h_t)
    for loss, fn in (("fsp", losses.fsp), ("gram", losses.fsp), ("nst", losses.nst), ("mmd", losses.nst)):
        match = IntermediateMatch([0, 1], [0, 1], loss=loss)
        assert match.loss_fn()(h_s, h_t, h_t, h_s, mask) == fn(h_s, h_t, h_t, h_s, mask)


# ----------------------------------------------------------------------------------------------- DistillationConfig
def test_distillation_config_defaults():
    cfg = DistillationConfig()
    assert (cfg.temperature, cfg.kd_loss_type, cfg.scale_by_temperature_squared, cfg.intermediate_matches) == (
        4.0,
        "ce",
        True,
        [],
    )
    assert cfg.kd_loss_fn() is losses.kd_ce
    assert DistillationConfig(kd_loss_type="bce").kd_loss_fn() is losses.kd_bce


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=0.0), "Expected `temperature` to be > 0 but got 0.0."),
        (
            dict(temperature_scheduler="linear"),
            "Expected `temperature_scheduler` to be one of 'constant', 'flsw', 'cwsm' but got 'linear'.",
        ),
        (dict(flsw_beta=-1.0), "Expected `flsw_beta` to be >= 0 but got -1.0."),
        (dict(flsw_gamma=-2.0), "Expected `flsw_gamma` to be >= 0 but got -2.0."),
        (dict(cwsm_beta=float("nan")), "Expected `cwsm_beta` to be >= 0 but got nan."),
        (dict(kd_loss_weight=-1), "Expected `kd_loss_weight` to be >= 0 but got -1."),
        (dict(hard_label_weight=-0.1), "Expected `hard_label_weight` to be >= 0 but got -0.1."),
        (
            dict(kd_loss_type="js"),
            "Expected `kd_loss_type` to be one of 'ce', 'kl', 'mse', 'bce', 'forward_kl', 'reverse_kl', 'jsd', 'tvd', "
            "a callable or a dotted import path (`mypkg.losses.fn`) but got 'js'.",
        ),
        (
            dict(kd_loss_weight_scheduler="cosine"),
            "Expected `kd_loss_weight_scheduler` to be one of 'constant', 'linear_decay', 'linear_growth', "
            "'first_stage', 'second_stage' but got "
            "'cosine'.",
        ),
        (
            dict(hard_label_weight_scheduler="none"),
            "Expected `hard_label_weight_scheduler` to be one of 'constant', 'linear_decay', 'linear_growth', "
            "'first_stage', 'second_stage' but got "
            "'none'.",
        ),
        (
            dict(kd_loss_type="bce", temperature_scheduler="cwsm"),
            "Expected `temperature_scheduler` to be 'constant' when `kd_loss_type` is 'bce' (flsw and cwsm are "
            "defined on softmax distributions) but got 'cwsm'.",
        ),
        (
            dict(kd_loss_type="bce", probability_shift=True),
            "Expected `probability_shift` to be False when `kd_loss_type` is 'bce' (it swaps class logits) but got "
            "True.",
        ),
        (
            dict(intermediate_matches=[IntermediateMatch(1, 1), IntermediateMatch(1, 1, weight=2.0)]),
            "Expected the names of `intermediate_matches` to be unique but got ['hidden_1_1_hidden_mse'] more than "
            "once; set `name` on the matches.",
        ),
    ],
)
def test_distillation_config_validation_messages(kwargs, message):
    assert error(DistillationConfig, **kwargs) == message


def test_weight_scheduler_names_match_the_schedulers_module():
    assert set(get_args(WeightScheduler)) == set(schedulers.WEIGHT_SCHEDULES)


def test_weights_and_temperatures_over_training():
    cfg = DistillationConfig(
        kd_loss_weight=2.0,
        kd_loss_weight_scheduler="linear_decay",
        hard_label_weight=0.5,
        hard_label_weight_scheduler="linear_growth",
        temperature_scheduler="flsw",
        flsw_beta=0.5,
        flsw_gamma=1.0,
    )
    assert [cfg.kd_loss_weight_at(p) for p in (0.0, 0.25, 1.0)] == [2.0, 1.5, 0.0]
    assert [cfg.hard_label_weight_at(p) for p in (0.0, 0.25, 1.0)] == [0.0, 0.125, 0.5]
    zs, zt = torch.randn(3, 4), torch.randn(3, 4)
    expected = schedulers.flsw_temperature(zs, zt, 4.0, beta=0.5, gamma=1.0)
    assert torch.equal(cfg.temperature_fn()(zs, zt, cfg.temperature), expected)


def test_matches_given_as_dicts_become_intermediate_matches():
    cfg = DistillationConfig(intermediate_matches=[{"layer_t": 2, "layer_s": 1, "loss": "cos"}])
    assert cfg.intermediate_matches == [IntermediateMatch(layer_t=2, layer_s=1, loss="cos")]


# ---------------------------------------------------------------------------------------------------- validate_layers
def test_validate_layers_messages():
    cfg = DistillationConfig(
        intermediate_matches=[
            IntermediateMatch(layer_t=2, layer_s=6),
            IntermediateMatch(layer_t=[0, 5], layer_s=[0, 1], loss="nst"),
            IntermediateMatch(layer_t=3, layer_s=1, feature="attention", loss="attention_mse"),
        ]
    )
    assert error(cfg.validate_layers, num_hidden_t=13, num_hidden_s=3, num_attn_t=12, num_attn_s=2) == (
        "Expected `layer_s` to be < 3 (the student returns 3 hidden states) but got 6 (intermediate match "
        "`hidden_6_2_hidden_mse`)."
    )
    cfg.intermediate_matches = cfg.intermediate_matches[1:]
    assert error(cfg.validate_layers, num_hidden_t=5, num_hidden_s=3, num_attn_t=12, num_attn_s=2) == (
        "Expected `layer_t` to be < 5 (the teacher returns 5 hidden states) but got 5 (intermediate match "
        "`hidden_0-1_0-5_nst`)."
    )
    assert error(cfg.validate_layers, num_hidden_t=13, num_hidden_s=3, num_attn_t=12, num_attn_s=1) == (
        "Expected `layer_s` to be < 1 (the student returns 1 attention maps) but got 1 (intermediate match "
        "`attention_1_3_attention_mse`)."
    )
    assert error(cfg.validate_layers, num_hidden_t=13, num_hidden_s=3, num_attn_t=None, num_attn_s=2) == (
        "Expected the teacher to return attention maps (intermediate match `attention_1_3_attention_mse`) but "
        "`num_attn_t` is None."
    )
    cfg.validate_layers(num_hidden_t=13, num_hidden_s=3, num_attn_t=12, num_attn_s=2)  # all fine


def test_config_parses_from_yaml_like_lightning_cli():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--distillation", type=DistillationConfig)
    config = parser.parse_string(
        """
        distillation:
          temperature: 8
          temperature_scheduler: cwsm
          intermediate_matches:
            - {layer_t: [0, 4], layer_s: [0, 2], loss: fsp, projection: [linear, 4, 8]}
            - {layer_t: 3, layer_s: 1, feature: attention, loss: attention_ce_mean}
        """
    )
    cfg = parser.instantiate(config).distillation
    assert cfg.temperature == 8.0 and cfg.temperature_scheduler == "cwsm"
    assert cfg.intermediate_matches[0] == IntermediateMatch([0, 4], [0, 2], loss="fsp", projection=("linear", 4, 8))
    assert cfg.intermediate_matches[1].name == "attention_1_3_attention_ce_mean"


# ------------------------------------------------------------------------------------- settings that give TextBrewer's
def _l1(feature_s, feature_t, mask):
    return (feature_s - feature_t).abs().mean()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(weight_schedule_mode="replace"),
            "Expected `weight_schedule_mode` to be one of 'multiply', 'textbrewer' but got 'replace'.",
        ),
        (
            dict(projection_init="xavier"),
            "Expected `projection_init` to be one of 'pytorch', 'textbrewer' but got 'xavier'.",
        ),
        (dict(flsw_eps=0.0), "Expected `flsw_eps` to be None or > 0 but got 0.0."),
    ],
)
def test_textbrewer_settings_of_the_config_are_validated(kwargs, message):
    assert error(DistillationConfig, **kwargs) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(variant="tb"), "Expected `variant` to be one of 'lit_kd', 'textbrewer' but got 'tb'."),
        (
            dict(loss=_l1, variant="textbrewer"),
            "Expected `variant` to be 'lit_kd' with a user loss (only built-in losses have a TextBrewer variant) but "
            "got 'textbrewer'.",
        ),
        (
            dict(score_threshold=-1e-3),
            "Expected `score_threshold` to be left at its default except for built-in attention losses of the "
            "'lit_kd' variant (the TextBrewer variant uses TextBrewer's -1e-3) but got -0.001 with "
            "`feature='hidden'`, `variant='lit_kd'`.",
        ),
        (
            dict(feature="attention", loss="attention_mse", score_threshold="low"),
            "Expected `score_threshold` to be a number (or -inf) but got 'low'.",
        ),
        (
            dict(projection_options={"lr": 1e-3}),
            "Expected `projection_options` to be None when `projection` is None (there is no projection to "
            "optimise) but got {'lr': 0.001}.",
        ),
        (
            dict(projection=("linear", 4, 8), projection_options={"params": []}),
            "Expected `projection_options` to be a dict of optimizer parameter-group options (e.g. {'lr': 1e-3}) "
            "without 'params' but got {'params': []}.",
        ),
        (
            dict(projection=("linear", 4, 8), projection_options={"lr": 0}),
            "Expected `projection_options['lr']` to be > 0 but got 0.",
        ),
    ],
)
def test_textbrewer_settings_of_a_match_are_validated(kwargs, message):
    kwargs = {"layer_t": 3, "layer_s": 1, **kwargs}
    assert error(IntermediateMatch, **kwargs) == message


def test_weight_schedule_modes():
    multiply = DistillationConfig(kd_loss_weight=2.0, kd_loss_weight_scheduler="linear_decay")
    textbrewer = DistillationConfig(
        kd_loss_weight=2.0, kd_loss_weight_scheduler="linear_decay", weight_schedule_mode="textbrewer"
    )
    assert [multiply.kd_loss_weight_at(p) for p in (0.0, 0.25, 1.0)] == [2.0, 1.5, 0.0]
    # TextBrewer replaces the weight by the schedule's value after the first optimizer step
    assert [textbrewer.kd_loss_weight_at(p) for p in (0.0, 0.25, 1.0)] == [2.0, 0.75, 0.0]
    growth = DistillationConfig(hard_label_weight=0.5, hard_label_weight_scheduler="linear_growth")
    assert [growth.hard_label_weight_at(p) for p in (0.0, 0.5)] == [0.0, 0.25]
    growth.weight_schedule_mode = "textbrewer"
    assert [growth.hard_label_weight_at(p) for p in (0.0, 0.5)] == [0.5, 0.5]


def test_match_variants_and_thresholds_choose_their_functions():
    torch.manual_seed(0)
    scores_s, scores_t = torch.randn(2, 3, 4, 4) * 3, torch.randn(2, 3, 4, 4) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    tb = IntermediateMatch(1, 1, feature="attention", loss="attention_ce_mean", variant="textbrewer")
    assert not tb.takes_scores
    assert tb.loss_fn()(scores_s, scores_t, mask) == losses.attention_ce_textbrewer(scores_s, scores_t, mask, "mean")
    low = IntermediateMatch(1, 1, feature="attention", loss="attention_mse", score_threshold=-1.0)
    assert low.takes_scores
    assert low.loss_fn()(scores_s, scores_t, None, scores=True) == losses.attention_mse(
        scores_s.masked_fill(scores_s <= -1, 0), scores_t.masked_fill(scores_t <= -1, 0)
    )
    h = [torch.randn(2, 4, 8) for _ in range(4)]
    nst = IntermediateMatch([0, 1], [0, 1], loss="mmd", variant="textbrewer").loss_fn()
    assert nst(*h, mask) == losses.nst(*h, mask, normalise="textbrewer")
    assert nst(*h, None) == losses.nst(*h, None)  # without a mask TextBrewer also divides by the width


def test_textbrewer_settings_parse_from_yaml():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--distillation", type=DistillationConfig)
    config = parser.parse_string(
        """
        distillation:
          temperature_scheduler: flsw
          flsw_eps: 1.0e-4
          weight_schedule_mode: textbrewer
          projection_init: textbrewer
          intermediate_matches:
            - {layer_t: 3, layer_s: 1, feature: attention, loss: attention_ce, variant: textbrewer}
            - {layer_t: 2, layer_s: 1, feature: attention, loss: attention_mse, score_threshold: -.inf}
            - {layer_t: [0, 2], layer_s: [0, 1], loss: gram, projection: [linear, 4, 8], projection_options: {lr: 0.01}}
        """
    )
    cfg = parser.instantiate(config).distillation
    assert (cfg.flsw_eps, cfg.weight_schedule_mode, cfg.projection_init) == (1e-4, "textbrewer", "textbrewer")
    ce, mse, gram = cfg.intermediate_matches
    assert ce.variant == "textbrewer" and mse.score_threshold == float("-inf")
    assert gram.two_layers and gram.projection_options == {"lr": 0.01}
