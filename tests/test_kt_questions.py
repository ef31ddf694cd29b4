"""Question-level knowledge tracing: question and multi-concept columns, expansion, batches with questions, leak-free
logits of expanded questions, question-level fusion of the metrics, and simulated students with questions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lit_kt import (
    AKT,
    SAKT,
    AKTModule,
    KTDataModule,
    KTDataset,
    KTFormatError,
    KTModule,
    SAKTModule,
    StudentSequence,
    collate_kt,
    fuse_questions,
    generate_students,
    group_window_spans,
    leak_free_logits,
    read_long_table,
    roc_auc,
    window_spans,
    write_three_line,
)
from tests.conftest import cpu_trainer

torch.set_num_threads(1)


def _write(tmp_path: Path, text: str, name: str = "table.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# StudentSequence
# ---------------------------------------------------------------------------------------------------------------------


def test_sequence_questions_default_none_and_equality() -> None:
    plain = StudentSequence([1, 2], [0, 1], "s")
    assert plain.questions is None and plain.interaction_ids is None
    assert plain == StudentSequence(np.array([1, 2]), np.array([0, 1]), "s")
    with_q = StudentSequence([1, 2], [0, 1], "s", questions=[5, 6])
    assert with_q.questions.dtype == np.int64
    assert with_q != plain
    assert with_q == StudentSequence([1, 2], [0, 1], "s", questions=[5, 6])
    assert with_q != StudentSequence([1, 2], [0, 1], "s", questions=[5, 7])
    grouped = StudentSequence([1, 2, 3], [1, 1, 0], "s", questions=[5, 5, 6], interaction_ids=[0, 0, 1])
    assert grouped.group_offsets.tolist() == [0, 1, 0]
    assert plain.group_offsets.tolist() == [0, 0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(questions=[1]), "questions of the length"),
        (dict(questions=[0, 1]), "question ids >= 1"),
        (dict(questions=[[1, 2]]), "1-D questions"),
        (dict(interaction_ids=[1, 1]), "start at 0"),
        (dict(interaction_ids=[0, 2]), "previous one or exceed it by 1"),
        (dict(interaction_ids=[0, 0]), "equal responses within an interaction"),
    ],
)
def test_sequence_rejects_bad_questions(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StudentSequence([1, 2], [0, 1], **kwargs)


def test_sequence_rejects_different_questions_in_one_interaction() -> None:
    with pytest.raises(ValueError, match="equal questions within an interaction"):
        StudentSequence([1, 2], [1, 1], questions=[3, 4], interaction_ids=[0, 0])


def test_three_line_writer_refuses_questions(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sequence 0 has them"):
        write_three_line([StudentSequence([1], [1], questions=[2])], tmp_path / "x.csv")


# ---------------------------------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------------------------------


def test_read_question_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "order_id,user_id,skill_id,problem_id,correct\n2,u1,4,40,1\n1,u1,3,31,0\n3,u2,3,30,1\n")
    seqs = read_long_table(path, question_col="problem_id")
    assert seqs[0] == StudentSequence([3, 4], [0, 1], "u1", questions=[31, 40])
    assert seqs[1] == StudentSequence([3], [1], "u2", questions=[30])
    assert read_long_table(path)[0] == StudentSequence([3, 4], [0, 1], "u1")  # the single-concept path unchanged


def test_read_concepts_column_expands(tmp_path: Path) -> None:
    text = "order_id,user_id,concepts,question,correct\n1,u1,3_17,9,1\n2,u1,5,8,0\n3,u1, 2 _ 4 _6 ,9,0\n"
    (seq,) = read_long_table(_write(tmp_path, text), question_col="question", concepts_col="concepts")
    assert seq.exercises.tolist() == [3, 17, 5, 2, 4, 6]
    assert seq.responses.tolist() == [1, 1, 0, 0, 0, 0]
    assert seq.questions.tolist() == [9, 9, 8, 9, 9, 9]
    assert seq.interaction_ids.tolist() == [0, 0, 1, 2, 2, 2]
    assert seq.group_offsets.tolist() == [0, 1, 0, 0, 1, 2]
    # another separator, no question column
    path = _write(tmp_path, "user_id,kc,correct\nu,1;2,1\n", "b.csv")
    (seq,) = read_long_table(path, concepts_col="kc", order_col=None, concept_sep=";")
    assert seq == StudentSequence([1, 2], [1, 1], "u", interaction_ids=[0, 0])


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ("u1,3_,9,1", r":3: Expected '_'-separated integer concept ids >= 1 .* an empty field as concept 2 of '3_'"),
        ("u1,3_0,9,1", r":3: .*concept ids >= 1 .* got '0' as concept 2"),
        ("u1,x,9,1", r":3: .*got 'x' as concept 1"),
        ("u1,4_4,9,1", r":3: Expected distinct concept ids in column 'concepts' but got 4 twice in '4_4'"),
        ("u1,4,0,1", r":3: Expected an integer question id >= 1 in column 'question' but got '0'"),
        ("u1,4,,1", r":3: Expected an integer question id >= 1 in column 'question' but got an empty field"),
    ],
)
def test_read_concepts_errors_name_file_and_line(tmp_path: Path, row: str, match: str) -> None:
    path = _write(tmp_path, f"user_id,concepts,question,correct\nu1,1,2,0\n{row}\n")
    with pytest.raises(KTFormatError, match=match) as info:
        read_long_table(path, order_col=None, question_col="question", concepts_col="concepts")
    assert info.value.line == 3 and str(info.value).startswith(f"{path}:3: ")


def test_read_concepts_missing_columns(tmp_path: Path) -> None:
    path = _write(tmp_path, "user_id,skill_id,correct\nu1,1,0\n")
    with pytest.raises(KTFormatError, match=r":1: Expected columns 'concepts', 'question'"):
        read_long_table(path, order_col=None, question_col="question", concepts_col="concepts")
    with pytest.raises(ValueError, match="concept_sep"):
        read_long_table(path, order_col=None, concepts_col="skill_id", concept_sep=",")


# ---------------------------------------------------------------------------------------------------------------------
# Windows, dataset, batches
# ---------------------------------------------------------------------------------------------------------------------


def test_group_window_spans_keep_questions_whole() -> None:
    for length, max_len, stride in [(9, 4, None), (9, 4, 2), (1, 3, None), (12, 5, 3)]:
        assert group_window_spans(np.arange(length), max_len, stride) == window_spans(length, max_len, stride)
    ids = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4])  # interactions of 3, 1, 2, 1, 3 rows
    bounds = {0, 3, 4, 6, 7, 10}
    for stride in (None, 1, 2, 4):
        spans = group_window_spans(ids, 4, stride)
        scored = [p for start, end, score_from in spans for p in range(score_from, end)]
        assert scored == list(range(10))  # every row scored exactly once
        for start, end, score_from in spans:
            assert {start, end, score_from} <= bounds and end - start <= 4 and start <= score_from < end
    with pytest.raises(ValueError, match="interaction 0 has 3 rows"):
        group_window_spans(np.array([0, 0, 0]), 2)


def test_batches_carry_questions_and_offsets() -> None:
    seqs = [
        StudentSequence([1, 2, 3], [1, 1, 0], questions=[7, 7, 8], interaction_ids=[0, 0, 1]),
        StudentSequence([4], [1], questions=[9], interaction_ids=[0]),
    ]
    batch = collate_kt([KTDataset(seqs, max_len=10)[i] for i in range(2)])
    assert batch["questions"].tolist() == [[7, 7, 8], [9, 0, 0]]
    assert batch["group_offset"].tolist() == [[0, 1, 0], [0, 0, 0]]
    plain = collate_kt([KTDataset([StudentSequence([1, 2], [0, 1])], max_len=10)[0]])
    assert set(plain) == {"exercises", "responses", "mask", "index"}
    with pytest.raises(ValueError, match="sequence 0 has them and sequence 1 lacks them"):
        KTDataset([seqs[0], StudentSequence([1], [1])], max_len=10)


def test_datamodule_num_questions_and_in_memory_questions() -> None:
    train = [StudentSequence([1, 2], [0, 1], f"s{i}", questions=[3, 11]) for i in range(10)]
    dm = KTDataModule(sequences={"train": train, "test": train[:2]}, batch_size=4)
    assert dm.num_questions == 11 and dm.model_sizes() == {"num_exercises": 2, "num_questions": 11}
    dm.setup("fit")
    assert dm.train_dataloader().__iter__().__next__()["questions"][0].tolist() == [3, 11]
    assert KTDataModule(sequences=[StudentSequence([1], [1])] * 3).num_questions == 0
    with pytest.raises(ValueError, match="`num_questions` to be >= the largest question id in the data \\(11"):
        _ = KTDataModule(sequences=train, num_questions=5).num_questions


def test_datamodule_reads_concepts_from_files(tmp_path: Path) -> None:
    rows = "".join(f"{i},u{i % 6},{1 + i % 3}_{4 + i % 2},{1 + i % 5},{i % 2}\n" for i in range(60))
    header = "order_id,user_id,concepts,question,correct\n"
    for name in ("train.csv", "test.csv"):
        _write(tmp_path, header + rows, name)
    dm = KTDataModule(str(tmp_path), format="long", question_col="question", concepts_col="concepts", max_len=7)
    assert dm.num_exercises == 5 and dm.num_questions == 5
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["group_offset"].max() == 1 and batch["questions"].shape == batch["exercises"].shape
    with pytest.raises(KTFormatError, match=r"train.csv:2: .*num_exercises.*exercise id 4"):
        KTDataModule(str(tmp_path), format="long", concepts_col="concepts", num_exercises=3).num_exercises


# ---------------------------------------------------------------------------------------------------------------------
# KTModule: questions reach the models that take them; leak-free logits; question-level fusion
# ---------------------------------------------------------------------------------------------------------------------


class _Recorder(nn.Module):
    """A KT model that records whether it got questions."""

    def __init__(self, num_exercises: int = 5, num_questions: int = 5) -> None:
        super().__init__()
        self.num_exercises, self.num_questions, self.max_len = num_exercises, num_questions, None
        self.config = dict(num_exercises=num_exercises, num_questions=num_questions)
        self.weight = nn.Parameter(torch.zeros(()))
        self.got: list[Tensor | None] = []

    def forward(self, exercises: Tensor, responses: Tensor, questions: Tensor | None = None) -> Tensor:
        self.got.append(questions)
        return exercises.float() * self.weight


def test_ktmodule_passes_questions_to_akt_not_to_sakt(monkeypatch: pytest.MonkeyPatch) -> None:
    ex, resp, q = torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 1]]), torch.tensor([[4, 5, 6]])
    akt = AKT(num_exercises=3, num_questions=6, d_model=8, num_heads=2, d_ff=8)
    seen = {}
    original = AKT.forward

    def spy(self, exercises, responses, questions=None, return_attention=False):
        seen["questions"] = questions
        return original(self, exercises, responses, questions, return_attention)

    monkeypatch.setattr(AKT, "forward", spy)
    AKTModule(akt)(ex, resp, q)
    assert seen["questions"] is q
    AKTModule(AKT(num_exercises=3, d_model=8, num_heads=2, d_ff=8))(ex, resp, q)  # num_questions=0: concept level
    assert seen["questions"] is None
    sakt = SAKTModule(SAKT(num_exercises=3, max_len=4, d_model=8, num_heads=2))
    assert sakt(ex, resp, q).shape == (1, 3)  # SAKT takes no questions: they are not passed
    recorder = _Recorder()
    KTModule(recorder)(ex, resp, q)
    assert recorder.got[-1] is q


class _CopyLast(nn.Module):
    """Causal toy model: logit at t = +5 / -5 for the response at t - 1 (0 at t = 0), plus the exercise id / 100."""

    def __init__(self) -> None:
        super().__init__()
        self.num_exercises, self.max_len, self.config = 10, None, {}

    def forward(self, exercises: Tensor, responses: Tensor, questions: Tensor | None = None) -> Tensor:
        previous = torch.nn.functional.pad(responses[:, :-1].float() * 10 - 5, (1, 0))
        return previous + exercises.float() / 100


def test_leak_free_logits_hide_the_question_from_its_own_rows() -> None:
    # Student: q1 (concepts 1, 2; right), q2 (concept 3; wrong), q3 (concepts 4, 5, 6; right); then padding.
    ex = torch.tensor([[1, 2, 3, 4, 5, 6, 0]])
    resp = torch.tensor([[1, 1, 0, 1, 1, 1, 0]])
    offset = torch.tensor([[0, 1, 0, 0, 1, 2, 0]])
    model = _CopyLast()
    leaky = model(ex, resp)
    assert leaky[0, 1] > 0 and leaky[0, 4] > 0  # plain expansion: rows 1 and 4 copy their own question's answer
    free = leak_free_logits(lambda e, r, q: model(e, r, q), ex, resp, None, offset)
    # Every row of a question sees only the previous *question*'s response: q1 none, q2 q1's, q3 q2's.
    expected = torch.tensor([[0.01, 0.02, 5.03, -4.96, -4.95, -4.94]])
    torch.testing.assert_close(free[:, :6], expected)  # the padded position's logit is meaningless
    # One row per question: a single ordinary pass.
    torch.testing.assert_close(leak_free_logits(lambda e, r, q: model(e, r, q), ex, resp, None, offset * 0), leaky)


def test_leak_free_logits_match_separate_histories() -> None:
    """Against pyKT's construction: row j of question i predicted from (all rows of questions < i) + row j."""
    torch.manual_seed(0)
    model = AKT(num_exercises=6, num_questions=4, d_model=8, num_heads=2, d_ff=8, dropout=0.0).eval()
    with torch.no_grad():
        model.difficulty.weight.normal_()
    ex = torch.tensor([[1, 2, 3, 4, 5, 6]])
    resp = torch.tensor([[1, 1, 0, 1, 1, 1]])
    q = torch.tensor([[1, 1, 2, 3, 3, 3]])
    offset = torch.tensor([[0, 1, 0, 0, 1, 2]])
    with torch.no_grad():
        free = leak_free_logits(lambda e, r, qq: model(e, r, qq), ex, resp, q, offset)
        # question 3 (rows 3..5): its row j, after q1 and q2 (the history rotated by j as leak_free_logits does)
        for j, row in enumerate((3, 4, 5)):
            history = [1, 0] if j % 2 else [0, 1]  # q1's two rows, rotated by j
            keep = [*history, 2, row]
            ref = model(ex[:, keep], resp[:, keep], q[:, keep])[0, -1]
            torch.testing.assert_close(free[0, row], ref)


def test_fusion_question_auc_differs_from_row_auc() -> None:
    # Three questions: A (2 concepts, right) rows 0.9 and 0.1 -> 0.5; B (1 concept, wrong) 0.6; C (3 concepts, right)
    # 0.7, 0.8, 0.6 -> 0.7.
    probs = torch.tensor([[0.9, 0.1, 0.6, 0.7, 0.8, 0.6]])
    resp = torch.tensor([[1, 1, 0, 1, 1, 1]])
    offset = torch.tensor([[0, 1, 0, 0, 1, 2]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    scores, labels = fuse_questions(probs, resp, mask, offset)
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.6, 0.7]))
    assert labels.tolist() == [1, 0, 1]
    # Questions: positives 0.5, 0.7 vs the negative 0.6 -> AUC 1/2. Rows: positives 0.9, 0.1, 0.7, 0.8, 0.6 vs 0.6
    # -> (1 + 0 + 1 + 1 + 0.5) / 5 = 0.7.
    assert roc_auc(scores.numpy(), labels.numpy()) == pytest.approx(0.5)
    assert roc_auc(probs[mask].numpy(), resp[mask].numpy()) == pytest.approx(0.7)
    # the masked rows are left out, whole questions at a time
    partial = torch.tensor([[False, False, True, True, True, True]])
    scores, labels = fuse_questions(probs, resp, partial, offset)
    torch.testing.assert_close(scores, torch.tensor([0.6, 0.7]))


def test_ktmodule_scores_each_question_once() -> None:
    seqs = [
        StudentSequence([1, 2, 3, 4], [1, 1, 0, 1], f"s{i}", questions=[1, 1, 2, 3], interaction_ids=[0, 0, 1, 2])
        for i in range(3)
    ]
    dm = KTDataModule(sequences={"train": seqs, "test": seqs}, batch_size=2, max_len=3, eval_stride=1)
    module = KTModule(_Recorder(num_exercises=4, num_questions=3))
    seen = []
    original = module.test_metrics.update
    module.test_metrics.update = lambda p, y: (seen.append(len(y)), original(p, y))[1]
    cpu_trainer().test(module, datamodule=dm)
    assert sum(seen) == 3 * 3  # 3 students x 3 questions, though each student has 4 rows


def test_fit_akt_rasch_on_question_students() -> None:
    dm = KTDataModule(synthetic_students=40, synthetic_exercises=4, synthetic_concepts=2, synthetic_questions=12,
                      synthetic_seq_len=10, batch_size=8)  # fmt: skip
    assert dm.num_questions == 12
    model = AKT(**dm.model_sizes(), d_model=8, num_heads=2, d_ff=8)
    module = AKTModule(model)
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=2)
    trainer.fit(module, datamodule=dm)
    assert 0.0 <= trainer.test(module, datamodule=dm)[0]["test/auc"] <= 1.0
    with pytest.raises(ValueError, match="question ids <= the model's `num_questions` \\(5"):
        cpu_trainer(max_epochs=1).fit(AKTModule(AKT(num_exercises=4, num_questions=5, d_model=8, num_heads=2)), dm)


# ---------------------------------------------------------------------------------------------------------------------
# Simulated students with questions
# ---------------------------------------------------------------------------------------------------------------------


def test_synthetic_without_questions_is_unchanged() -> None:
    kwargs = dict(num_students=20, num_exercises=6, num_concepts=3, seq_len=12, seed=5)
    new = generate_students(**kwargs)
    assert all(s.questions is None for s in new.sequences) and new.question_difficulty is None
    assert generate_students(**kwargs, num_questions=0).sequences == new.sequences
    # Values of the simulator before questions existed (same seed and arguments).
    assert new.sequences[0].exercises.tolist() == [2, 3, 1, 5, 6, 3, 1, 5, 1, 4, 2, 6]
    assert new.sequences[0].responses.tolist() == [0, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 0]
    np.testing.assert_array_equal(
        new.probabilities[0][:3], [0.4418417651542168, 0.5681385416819029, 0.31415349976739626]
    )


def test_synthetic_questions_within_exercises() -> None:
    sim = generate_students(num_students=300, num_exercises=5, num_concepts=5, num_questions=40, seq_len=30, seed=1)
    assert sorted(set(sim.question_exercises.tolist())) == [1, 2, 3, 4, 5]  # every exercise has questions
    for seq in sim.sequences:
        assert seq.questions is not None and 1 <= seq.questions.min() and seq.questions.max() <= 40
        np.testing.assert_array_equal(seq.exercises, sim.question_exercises[seq.questions - 1])
    offsets = sim.question_difficulty - sim.exercise_difficulty[sim.question_exercises - 1]
    assert 0.5 < offsets.std() < 1.5  # question_spread = 1
    oracle = sim.oracle_auc()
    labels = np.concatenate([s.responses for s in sim.sequences])
    blind = roc_auc(np.concatenate(sim.oracle_probabilities(use_questions=False)), labels)
    assert oracle > blind + 0.02  # the question difficulties matter, and the oracle uses them
    assert sim.true_probability_auc() > oracle
    with pytest.raises(ValueError, match="num_questions"):
        generate_students(num_exercises=5, num_concepts=2, num_questions=3)


def test_prediction_writer_adds_question_and_interaction_columns(tmp_path: Path) -> None:
    from lit_kt import PredictionWriter

    seqs = [StudentSequence([1, 2, 3], [1, 1, 0], "s", questions=[4, 4, 5], interaction_ids=[0, 0, 1])] * 2
    dm = KTDataModule(sequences={"train": seqs, "test": seqs}, batch_size=2)
    writer = PredictionWriter(str(tmp_path / "p.csv"))
    trainer = cpu_trainer(callbacks=[writer])
    trainer.predict(KTModule(_Recorder(num_exercises=3, num_questions=5)), datamodule=dm, return_predictions=False)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "sequence,student,position,exercise,question,interaction,response,probability"
    assert lines[2].startswith("0,s,1,2,4,0,1,") and len(lines) == 7


def test_calibration_collects_the_logits_of_the_metrics_with_questions() -> None:
    """Temperature scaling fits on the logits the metrics see: with the questions (Rasch) and leak-free rows."""
    from lit_kt.calibration import collect_logits

    torch.manual_seed(0)
    akt = AKT(num_exercises=4, num_questions=6, d_model=8, num_heads=2, d_ff=8)
    with torch.no_grad():
        akt.difficulty.weight.normal_()  # questions now change the logits
    module = AKTModule(akt).eval()
    batch = {
        "exercises": torch.tensor([[1, 2, 2, 3, 0], [4, 1, 3, 0, 0]]),
        "responses": torch.tensor([[1, 0, 0, 1, 0], [0, 1, 1, 0, 0]]),
        "questions": torch.tensor([[1, 2, 2, 5, 0], [6, 3, 4, 0, 0]]),
        "group_offset": torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]),  # question 2 expanded into two rows
        "mask": torch.tensor([[True, True, True, True, False], [True, True, True, False, False]]),
    }
    logits, labels = collect_logits(module, [batch])
    with torch.no_grad():
        expected = leak_free_logits(
            lambda e, r, q: akt(e, r, questions=q),
            batch["exercises"],
            batch["responses"],
            batch["questions"],
            batch["group_offset"],
        )[batch["mask"]]
        blind = akt(batch["exercises"], batch["responses"])[batch["mask"]]
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, blind)  # the question-blind logits are not what was collected
    assert labels.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def test_predict_next_with_questions_matches_the_forward() -> None:
    from lit_kt import predict_next

    torch.manual_seed(0)
    akt = AKT(num_exercises=4, num_questions=6, d_model=8, num_heads=2, d_ff=8).eval()
    with torch.no_grad():
        akt.difficulty.weight.normal_()
    ex, resp, q = [1, 2, 3], [1, 0, 1], [2, 3, 5]
    got = predict_next(akt, ex, resp, [4, 2], questions=q, candidate_questions=[6, 1])
    with torch.no_grad():
        full = akt(torch.tensor([ex + [4], ex + [2]]), torch.tensor([resp + [0]] * 2), torch.tensor([q + [6], q + [1]]))
    torch.testing.assert_close(got, torch.sigmoid(full[:, -1]))
    # The question changes the prediction of the same concept.
    other = predict_next(akt, ex, resp, [4, 2], questions=q, candidate_questions=[5, 4])
    assert not torch.allclose(got, other)
    assert torch.allclose(AKTModule(akt).predict_next(ex, resp, [4, 2], q, [6, 1]), got)
    with pytest.raises(ValueError, match="candidate_questions"):
        predict_next(akt, ex, resp, [4], questions=q)
    with pytest.raises(ValueError, match=r"num_questions \(6\) but got 7 at position 1"):
        predict_next(akt, ex, resp, [4], questions=[1, 7, 2], candidate_questions=[1])
    with pytest.raises(ValueError, match="length of `candidates`"):
        predict_next(akt, ex, resp, [4], questions=q, candidate_questions=[1, 2])
    with pytest.raises(ValueError, match="embeds question ids"):
        predict_next(
            AKT(num_exercises=4, d_model=8, num_heads=2, d_ff=8), ex, resp, [4], questions=q, candidate_questions=[1]
        )
