"""On-policy and sequence-level distillation data (GKD, as TRL's ``GKDTrainer``): who generates which batch, the
completion-only loss on a generated batch by hand, reproducible draws close to the fraction, argument checks, and a
short fit with half of the batches on-policy that reports the time per step of both kinds."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from lit_kd import DistillationConfig, DistillationModule
from lit_kd.generation import batch_source, completion_batch, generate, generated_batch, prompts

V, P, C, EOS = 50, 6, 5, 49  # vocabulary, prompt length, reference completion length, end of sequence


def tiny_gpt2(n_layer: int = 1, seed: int = 0) -> GPT2LMHeadModel:
    """A random GPT-2 without dropout; EOS (and, by default, pad) is token 49."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=2, vocab_size=V, n_positions=64, bos_token_id=EOS, eos_token_id=EOS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def prompt_batch(size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts of random lengths and their reference completions (labels -100 on the prompt)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, V - 1, (size, P), generator=g)
    lengths = torch.randint(2, P + 1, (size,), generator=g)
    lengths[0] = 2  # at least one padded prompt
    prompt_mask = (torch.arange(P) >= (P - lengths)[:, None]).long()  # (B, P): left padding
    prompt = prompt.masked_fill(prompt_mask == 0, 0)
    completion = torch.randint(0, V - 1, (size, C), generator=g)
    input_ids = torch.cat([prompt, completion], dim=1)  # (B, P + C)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)
    labels = torch.cat([torch.full_like(prompt, -100), completion], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_input_ids": prompt,
        "prompt_attention_mask": prompt_mask,
    }


def spy_generate(model: nn.Module) -> list[dict]:
    """Record every ``model.generate`` call (its keyword arguments, the model's mode, whether grad was on)."""
    calls: list[dict] = []
    original = model.generate

    def generate(*args, **kwargs):
        calls.append({"training": model.training, "grad": torch.is_grad_enabled(), **kwargs})
        return original(*args, **kwargs)

    model.generate = generate
    return calls


def fit(module: DistillationModule, tmp_path, batches: list[dict], max_steps: int | None = None) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, max_steps=max_steps or -1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None, shuffle=False))
    return trainer


def module(**kwargs) -> DistillationModule:
    config = kwargs.pop("config", DistillationConfig(temperature=2.0, hard_label_weight=0.5))
    kwargs.setdefault("task_type", "causal_lm")
    kwargs.setdefault("max_new_tokens", 4)
    return DistillationModule(tiny_gpt2(2, 0), tiny_gpt2(1, 1), config, **kwargs)


# ------------------------------------------------------------------------------------------------ who generates
def test_fraction_one_makes_the_student_generate_every_training_batch_in_eval_mode_without_grad(tmp_path):
    m = module(on_policy_fraction=1.0, generation_temperature=0.7, generation_top_k=5)
    student_calls, teacher_calls = spy_generate(m.student), spy_generate(m.teachers["default"][0])
    trainer = fit(m, tmp_path, [prompt_batch(seed=s) for s in range(3)])
    assert len(student_calls) == 3 and teacher_calls == []
    for call in student_calls:
        assert not call["training"] and not call["grad"]
        assert call["do_sample"] and call["max_new_tokens"] == 4 and call["temperature"] == 0.7 and call["top_k"] == 5
        assert call["input_ids"].shape == (4, P) and call["pad_token_id"] == EOS
    metrics = trainer.callback_metrics
    assert metrics["train/on_policy"].item() == 1.0 and "train/seq_kd" not in metrics
    assert "train/hard" not in metrics and torch.isfinite(metrics["train/kd"])  # generated: KD only, as TRL
    assert set(m.step_seconds) == {"on_policy"} and m.step_seconds["on_policy"] > 0
    assert m.student.training  # back in train mode after generating


def test_seq_kd_with_fraction_zero_makes_the_teacher_generate(tmp_path):
    m = module(seq_kd=True)
    student_calls, teacher_calls = spy_generate(m.student), spy_generate(m.teachers["default"][0])
    trainer = fit(m, tmp_path, [prompt_batch(seed=s) for s in range(2)])
    assert student_calls == [] and len(teacher_calls) == 2
    assert not any(call["grad"] or call["training"] for call in teacher_calls)
    metrics = trainer.callback_metrics
    assert metrics["train/seq_kd"].item() == 1.0 and metrics["train/on_policy"].item() == 0.0
    assert set(m.step_seconds) == {"seq_kd"}


def test_no_fraction_and_no_seq_kd_is_the_plain_behaviour_without_any_generation():
    plain, explicit = module(), module(on_policy_fraction=0.0, seq_kd=False)
    calls = spy_generate(explicit.student) + spy_generate(explicit.teachers["default"][0])
    assert not explicit.generates
    for s in range(2):
        batch = prompt_batch(seed=s)
        torch.testing.assert_close(explicit.training_step(batch, s), plain.training_step(batch, s))
    assert calls == [] and explicit.step_seconds == {}
    # the hard-label term counts on the data's batches
    assert set(plain.distiller.loss_terms(*_views(plain, prompt_batch()), 0.0)) == {"kd", "hard"}


def _views(m: DistillationModule, batch: dict):
    d = m.distiller
    return d.student_view(batch, *d.call_student(m.student, batch)), d.teacher_views(batch)


# ------------------------------------------------------------------------------------------------ the loss by hand
def test_loss_on_a_generated_batch_is_the_kd_divergence_on_completion_tokens_only_by_hand():
    T = 2.0
    config = DistillationConfig(
        kd_loss_type="kl", temperature=T, scale_by_temperature_squared=False, hard_label_weight=1
    )
    m = module(on_policy_fraction=1.0, config=config)
    batch = {
        "input_ids": torch.zeros(2, 3, dtype=torch.long),  # the data's sequences: not read on a generated batch
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "labels": torch.zeros(2, 3, dtype=torch.long),
        "prompt_input_ids": torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]]),  # (B, P=4), row 0 left-padded
        "prompt_attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
    }
    # what the student "samples": row 0 stops at EOS (then arbitrary ids), row 1 runs to max_new_tokens
    sequences = torch.tensor([[0, 0, 5, 6, 10, EOS, 7, 8], [1, 2, 3, 4, 11, 12, 13, 14]])
    m.student.generate = lambda **kwargs: sequences.clone()
    loss = m.train().training_step(batch, 0)
    # by hand: each row's real positions, their positions counted from the first real token, and the completion
    # tokens that count (row 0: 10 and the EOS; row 1: all four), each predicted from the position before it
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 0, 0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7]])
    targets = [(0, 4), (0, 5), (1, 4), (1, 5), (1, 6), (1, 7)]  # (row, position of the scored token)
    with torch.no_grad():
        inputs = {"input_ids": sequences, "attention_mask": attention, "position_ids": positions}
        zs, zt = m.student(**inputs).logits, m.teachers["default"][0](**inputs).logits  # (B, L, V)
    kl = []
    for b, t in targets:
        log_p_s, log_p_t = F.log_softmax(zs[b, t - 1] / T, -1), F.log_softmax(zt[b, t - 1] / T, -1)
        kl.append((log_p_t.exp() * (log_p_t - log_p_s)).sum())
    torch.testing.assert_close(loss, torch.stack(kl).mean(), rtol=1e-5, atol=1e-6)  # no hard-label term


def test_completion_batch_masks_prompt_and_everything_after_the_first_eos():
    sequences = torch.tensor([[0, 3, 8, 9, 8, 9], [2, 3, 9, 1, 1, 1], [2, 3, 4, 5, 6, 7]])  # P=2, EOS=9
    mask = torch.tensor([[0, 1], [1, 1], [1, 1]])
    out = completion_batch(sequences, mask, eos_token_id=9, pad_token_id=0)
    assert out["labels"].tolist() == [
        [-100, -100, 8, 9, -100, -100],
        [-100, -100, 9, -100, -100, -100],
        [-100, -100, 4, 5, 6, 7],
    ]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1] * 6]
    assert out["input_ids"].tolist() == [[0, 3, 8, 9, 0, 0], [2, 3, 9, 0, 0, 0], [2, 3, 4, 5, 6, 7]]
    assert out["position_ids"].tolist() == [[0, 0, 1, 2, 0, 0], [0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 4, 5]]
    assert completion_batch(sequences, mask, eos_token_id=None)["labels"][1].tolist() == [-100, -100, 9, 1, 1, 1]


def test_generated_sequences_are_scored_with_the_positions_they_were_generated_with():
    model = tiny_gpt2(1, 3).train()
    batch = prompt_batch(size=3, seed=4)
    torch.manual_seed(0)
    out = generated_batch(model, {**batch, "task": "default"}, max_new_tokens=6)
    assert model.training and out["task"] == "default" and out["input_ids"].shape[1] <= P + 6
    assert bool((out["labels"][:, :P] == -100).all())
    model.eval()
    row = 0  # the left-padded prompt: scoring without the padding gives the same logits
    real = out["attention_mask"][row].bool()
    with torch.no_grad():
        full = model(**{k: out[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits[row][real]
        alone = model(input_ids=out["input_ids"][row][real][None]).logits[0]
    torch.testing.assert_close(full, alone, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)  # sampling follows the global seed
    again = generate(model, batch["prompt_input_ids"], batch["prompt_attention_mask"], max_new_tokens=6)
    assert not model.training  # its mode is restored (eval here)
    assert torch.equal(completion_batch(again, batch["prompt_attention_mask"], EOS, EOS)["input_ids"], out["input_ids"])


# ------------------------------------------------------------------------------------------------ the draws
def test_on_policy_draws_are_reproducible_for_a_seed_and_close_to_the_fraction():
    n, fraction = 200, 0.5
    draws = [batch_source(7, i, fraction, seq_kd=False) for i in range(n)]
    assert draws == [batch_source(7, i, fraction, seq_kd=False) for i in range(n)]
    assert draws != [batch_source(8, i, fraction, seq_kd=False) for i in range(n)]
    k = draws.count("student")
    assert set(draws) == {"student", None}
    assert abs(k - n * fraction) <= 4 * math.sqrt(n * fraction * (1 - fraction))  # a 4-sigma binomial bound
    with_seq_kd = [batch_source(7, i, fraction, seq_kd=True) for i in range(n)]
    assert with_seq_kd == [d if d is not None else "teacher" for d in draws]  # the same student batches
    assert {batch_source(0, i, 0.0, False) for i in range(n)} == {None}
    assert {batch_source(0, i, 1.0, True) for i in range(n)} == {"student"}
    # a module outside a Trainer draws by its count of training batches
    a, b = module(on_policy_fraction=0.3, on_policy_seed=7), module(on_policy_fraction=0.3, on_policy_seed=7)
    drawn = [a._draw_source() for _ in range(50)]
    assert drawn == [b._draw_source() for _ in range(50)] == [batch_source(7, i, 0.3, False) for i in range(50)]


# ------------------------------------------------------------------------------------------------ checks
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_policy_fraction": 1.5}, r"`on_policy_fraction` to be in \[0, 1\].*1.5"),
        ({"on_policy_fraction": -0.1}, r"`on_policy_fraction` to be in \[0, 1\]"),
        ({"on_policy_fraction": True}, r"`on_policy_fraction` to be a number"),
        ({"seq_kd": "yes"}, r"`seq_kd` to be True or False"),
        ({"max_new_tokens": 0}, r"`max_new_tokens` to be an integer >= 1.*0"),
        ({"generation_temperature": 0.0}, r"`generation_temperature` to be a finite number > 0"),
        ({"generation_temperature": float("nan")}, r"`generation_temperature` to be a finite number > 0"),
        ({"generation_top_k": 0}, r"`generation_top_k` to be None or an integer >= 1"),
        ({"on_policy_seed": 1.5}, r"`on_policy_seed` to be an integer"),
        ({"on_policy_fraction": 0.5, "task_type": "sequence"}, r"task_type='causal_lm' with on_policy_fraction=0.5"),
        ({"seq_kd": True, "task_type": "token"}, r"task_type='causal_lm' with seq_kd=True.*'token'"),
        (
            {"on_policy_fraction": 0.5, "config": DistillationConfig(kd_loss_weight=0.0, hard_label_weight=1.0)},
            r"`kd_loss_weight` > 0 with on_policy_fraction=0.5",
        ),
    ],
)
def test_generation_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        module(**kwargs)


class NoGenerate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, V)

    def forward(self, input_ids):
        return self.embed(input_ids)


def test_models_without_generate_and_batches_without_left_padded_prompts_are_refused():
    with pytest.raises(ValueError, match="the student to have `generate`.*NoGenerate"):
        DistillationModule(tiny_gpt2(1), NoGenerate(), task_type="causal_lm", num_labels=V, on_policy_fraction=0.5)
    with pytest.raises(ValueError, match="the teacher to have `generate`.*NoGenerate"):
        DistillationModule(NoGenerate(), tiny_gpt2(1), task_type="causal_lm", seq_kd=True)
    m = module(on_policy_fraction=1.0)
    batch = prompt_batch()
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with pytest.raises(ValueError, match=r"`prompt_input_ids` and `prompt_attention_mask`.*\['attention_mask'"):
        m.training_step(plain, 0)
    right = {**batch, "prompt_attention_mask": batch["prompt_attention_mask"].flip(-1)}
    with pytest.raises(ValueError, match="left-padded, non-empty prompts"):
        prompts(right)
    with pytest.raises(ValueError, match="`teacher`/`student` parts"):
        m.training_step({"teacher": batch, "student": batch}, 0)


# ------------------------------------------------------------------------------------------------ fit
def test_a_short_fit_with_half_the_batches_on_policy_reports_both_step_times(tmp_path):
    seed, steps = 0, 6
    kinds = [batch_source(seed, i, 0.5, seq_kd=False) for i in range(steps)]
    assert set(kinds) == {"student", None}  # this seed mixes both kinds in the first steps
    m = module(on_policy_fraction=0.5, on_policy_seed=seed)
    calls = spy_generate(m.student)
    trainer = fit(m, tmp_path, [prompt_batch(seed=s) for s in range(steps)])
    assert trainer.global_step == steps and len(calls) == kinds.count("student")
    metrics = trainer.callback_metrics
    for name in ("train/step_s_on_policy", "train/step_s_off_policy", "train/kd", "train/loss"):
        assert torch.isfinite(metrics[name]) and metrics[name].item() > 0, name
    assert set(m.step_seconds) == {"on_policy", "off_policy"}
    assert metrics["train/on_policy"].item() == float(kinds[-1] == "student")
