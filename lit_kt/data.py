"""Knowledge-tracing data: windowing of student sequences, a Dataset, its collate function and ``KTDataModule``.

A batch is a dict of tensors:

- ``exercises`` (B, L) int64 exercise ids, right-padded with 0;
- ``responses`` (B, L) int64 0/1 (0 at padding);
- ``mask`` (B, L) bool, the positions that are *scored* (loss and metrics): real positions, minus the context-only
  positions of overlapping evaluation windows, so that every interaction is scored exactly once;
- ``index`` (B,) int64, the window's index in its dataset;
- ``questions`` (B, L) int64 question ids, 0 at padding: only when the sequences have questions
  (:attr:`~lit_kt.formats.StudentSequence.questions`);
- ``group_offset`` (B, L) int64, each row's position among the rows expanded from one multi-concept question (0 for
  its first concept row, for single-concept rows and at padding): only when the sequences have ``interaction_ids``.
  Windows then start and end on interaction boundaries, so a question's rows are never split between windows (see
  :func:`group_window_spans` and ``docs/kt_question_level.md``).

Under DDP the evaluation loaders split their windows over the processes without repeating any
(:func:`distributed_eval_sampler`), so validation and test metrics equal the single-process figures.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from lit_kt.formats import KTFormatError, StudentSequence, find_exercise_above, read_long_table, read_three_line


class ExerciseIdError(KTFormatError):
    """An exercise id above the range the model embeds (``num_exercises``) or above ``max_exercise_id``.

    The message starts with ``"<path>:<line>: "``, the line of the first offending interaction in the file; for
    in-memory data (``KTDataModule(sequences=...)``) ``path`` is the student, e.g. ``"sequences['train'][3]: "``, and
    ``line`` is ``None`` (the message names the 0-based position in the student's sequence).
    """


_SPLITS = ("train", "val", "test")


def _in_memory_array(values: Any, where: str, name: str) -> np.ndarray:
    """One student's ``exercises`` or ``responses`` given in memory, as a 1-D integer-valued array.

    Integer and boolean arrays pass as they are; float arrays must hold integral, finite values; Python ints beyond
    int64 stay an object array (compared exactly by the caller). ``where`` (e.g. ``"sequences['train'][3]"``) starts
    every error message.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = (values.double() if values.is_floating_point() else values).numpy()
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as e:  # e.g. ragged nested lists
        raise TypeError(
            f"{where}: Expected {name} as a 1-D sequence of integers but got a {type(values).__name__} ({e})"
        ) from e
    if arr.ndim != 1:
        raise ValueError(f"{where}: Expected 1-D {name} but got an array of shape {arr.shape}")
    if arr.dtype.kind == "O" and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in arr):
        return arr  # Python ints beyond int64
    if arr.size and arr.dtype.kind not in "biuf":
        raise TypeError(f"{where}: Expected integer {name} but got an array of dtype {arr.dtype}")
    if arr.dtype.kind == "f" and arr.size:
        finite = np.isfinite(arr)
        bad = ~finite | (np.where(finite, arr, 0) != np.round(np.where(finite, arr, 0)))
        if bad.any():
            pos = int(np.argmax(bad))
            raise ValueError(f"{where}: Expected integer {name} but got {arr[pos].item()!r} at position {pos}")
    return arr


def _in_memory_student(item: Any, where: str, max_exercise_id: int, num_exercises: int | None) -> StudentSequence:
    """Validates one in-memory student (a :class:`StudentSequence` or an ``(exercises, responses)`` pair).

    Args:
        item: The student.
        where: The student's place in the input, e.g. ``"sequences['train'][3]"``; it starts every error message.
        max_exercise_id: The data module's ``max_exercise_id``.
        num_exercises: The data module's explicit ``num_exercises``, or ``None``.

    Returns:
        The student as a :class:`StudentSequence` (int64 arrays; a given ``StudentSequence`` keeps its ``student``).

    Raises:
        TypeError: If the item is neither a ``StudentSequence`` nor a pair, or its values are not numbers.
        ValueError: If the lengths differ, the student has no interaction, a value is not an integer, an exercise
            id is below 1 or a response is not 0 or 1.
        ExerciseIdError: If an exercise id is above ``max_exercise_id`` or an explicit ``num_exercises``.
    """
    student = None
    extra = {}
    if isinstance(item, StudentSequence):
        exercises, responses, student = item.exercises, item.responses, item.student
        extra = {"questions": item.questions, "interaction_ids": item.interaction_ids}
    elif isinstance(item, tuple | list) and len(item) == 2:
        exercises = _in_memory_array(item[0], where, "exercises")
        responses = _in_memory_array(item[1], where, "responses")
    else:
        found = f"a {type(item).__name__}" + (f" of length {len(item)}" if isinstance(item, tuple | list) else "")
        raise TypeError(
            f"{where}: Expected a StudentSequence or an (exercises, responses) pair of integer sequences but got"
            f" {found}"
        )
    if len(exercises) != len(responses):
        raise ValueError(
            f"{where}: Expected exercises and responses of equal length but got {len(exercises)} exercises and"
            f" {len(responses)} responses"
        )
    if len(exercises) == 0:
        raise ValueError(f"{where}: Expected at least one interaction but got an empty student")
    low = np.asarray(exercises < 1, dtype=bool)
    if low.any():
        pos = int(np.argmax(low))
        raise ValueError(
            f"{where}: Expected exercise ids >= 1 (0 is reserved for padding) but got {int(exercises[pos])} at"
            f" position {pos}"
        )
    bad = np.asarray((responses != 0) & (responses != 1), dtype=bool)
    if bad.any():
        pos = int(np.argmax(bad))
        raise ValueError(f"{where}: Expected responses 0 or 1 but got {int(responses[pos])} at position {pos}")
    bounds = [
        (
            num_exercises,
            f"Expected `num_exercises` ({num_exercises}) to be >= the largest exercise id in the data (the model"
            " embeds ids 1..num_exercises)",
            "",
        ),
        (
            max_exercise_id,
            f"Expected exercise ids <= `max_exercise_id` ({max_exercise_id}, a sanity bound: the embedding tables"
            " have a row per id)",
            "; number the exercises 1..N or raise `max_exercise_id`",
        ),
    ]
    for bound, expected, suffix in bounds:
        high = np.asarray(exercises > bound, dtype=bool) if bound is not None else None
        if high is not None and high.any():
            pos = int(np.argmax(high))
            raise ExerciseIdError(
                where, None, f"{expected} but got exercise id {int(exercises[pos])} at position {pos}{suffix}"
            )
    return StudentSequence(exercises.astype(np.int64), responses.astype(np.int64), student, **extra)


def check_max_len(data_max_len: int, model_max_len: int | None, origin: str = "") -> None:
    """Checks that the data module's windows fit the model's ``max_len`` (``None``: the model has no limit).

    Args:
        data_max_len: The data module's ``max_len``, the longest window it feeds the model.
        model_max_len: The model's ``max_len`` (SAKT's position embedding), or ``None`` for an unbounded model (DKT).
        origin: Appended to the message to say where the model's value comes from (e.g. a checkpoint).

    Raises:
        ValueError: If ``data_max_len > model_max_len``.
    """
    if model_max_len is not None and data_max_len > model_max_len:
        raise ValueError(
            f"Expected the data module's `max_len` (--data.max_len, {data_max_len}) to be <= the model's `max_len`"
            f" (--model.init_args.model.init_args.max_len, {model_max_len}{origin}) but got a larger one: the data"
            f" is cut into windows of up to {data_max_len} interactions and the model reads at most {model_max_len}."
            " Set both to the same value."
        )


@dataclass(frozen=True)
class Window:
    """A slice ``[start, end)`` of sequence ``sequence``; positions ``>= score_from`` are scored."""

    sequence: int
    start: int
    end: int
    score_from: int


def window_spans(length: int, max_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Cut a sequence of ``length`` interactions into windows of at most ``max_len``.

    Window ``k`` ends at ``min(length, max_len + k * stride)`` and starts ``max_len`` before its end (or at 0). It
    scores the positions the previous window did not reach, so every position is scored exactly once. With
    ``stride == max_len`` (the default) the windows do not overlap (the SAKT paper's protocol); a smaller stride gives
    later positions up to ``max_len - 1`` interactions of context at the cost of more windows.

    Args:
        length: Number of interactions in the sequence (>= 1).
        max_len: Longest window.
        stride: How far each window's end moves; 1 <= stride <= max_len. ``None`` means ``max_len``.

    Returns:
        A list of ``(start, end, score_from)`` tuples in order.

    Raises:
        ValueError: If an argument is out of range.
    """
    stride = max_len if stride is None else stride
    if max_len < 1:
        raise ValueError(f"Expected `max_len` to be >= 1 but got {max_len}.")
    if not 1 <= stride <= max_len:
        raise ValueError(f"Expected `stride` to be between 1 and max_len ({max_len}) but got {stride}.")
    spans = []
    scored_until = 0
    end = min(length, max_len)
    while scored_until < length:
        spans.append((max(0, end - max_len), end, scored_until))
        scored_until = end
        end = min(length, end + stride)
    return spans


def group_window_spans(
    interaction_ids: np.ndarray, max_len: int, stride: int | None = None
) -> list[tuple[int, int, int]]:
    """:func:`window_spans` for expanded sequences: windows start, end and start scoring on interaction boundaries.

    The rows expanded from one multi-concept question (equal ``interaction_ids``) always fall in the same window and
    are scored together, so that each question is scored once, from one window (see ``docs/kt_question_level.md``).
    Each window end is the furthest interaction boundary within ``stride`` of the previous end (at least one more
    interaction), and each start the first boundary at most ``max_len`` rows before the end. With one row per
    interaction (``interaction_ids == arange(L)``) the spans are those of :func:`window_spans`.

    Args:
        interaction_ids: ``(L,)`` interaction ids of a sequence (see :class:`~lit_kt.formats.StudentSequence`).
        max_len: Longest window; must hold the largest interaction (its rows).
        stride: How far each window's end may move; 1 <= stride <= max_len. ``None`` means ``max_len``.

    Returns:
        A list of ``(start, end, score_from)`` tuples in order.

    Raises:
        ValueError: If an argument is out of range, or an interaction has more rows than ``max_len``.
    """
    length = len(interaction_ids)
    stride = max_len if stride is None else stride
    window_spans(1, max_len, stride)  # validates max_len and stride
    ids = np.asarray(interaction_ids)
    bounds = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True])  # (I + 1,) starts of interactions, then L
    sizes = np.diff(bounds)
    if sizes.size and sizes.max() > max_len:
        big = int(np.argmax(sizes))
        raise ValueError(
            f"Expected every interaction to fit in a window of `max_len` ({max_len}) rows but interaction {big} has"
            f" {int(sizes[big])} rows (one per concept); raise `max_len`."
        )
    spans = []
    scored_until = 0
    limit = min(length, max_len)
    while scored_until < length:
        end = int(bounds[np.searchsorted(bounds, limit, side="right") - 1])  # furthest boundary <= limit
        if end <= scored_until:
            end = int(bounds[np.searchsorted(bounds, scored_until, side="right")])  # the next interaction whole
        start = int(bounds[np.searchsorted(bounds, end - max_len, side="left")])  # first boundary >= end - max_len
        spans.append((start, end, scored_until))
        scored_until = end
        limit = min(length, end + stride)
    return spans


class KTDataset(Dataset):
    """Windows over student sequences, each item a dict of 1-D numpy arrays.

    Sequences with questions give items a ``questions`` array; sequences with ``interaction_ids`` give items a
    ``group_offset`` array and are cut with :func:`group_window_spans`. Either every sequence has questions or none
    has (and the same for ``interaction_ids``), so that every batch has the same keys.

    Args:
        sequences: The students' sequences.
        max_len: Longest window.
        stride: Window stride (see :func:`window_spans`); ``None`` for non-overlapping windows.

    Raises:
        ValueError: If some sequences have questions (or ``interaction_ids``) and others not.
    """

    def __init__(self, sequences: Sequence[StudentSequence], max_len: int, stride: int | None = None) -> None:
        self.sequences = list(sequences)
        self.has_questions = _all_or_none(self.sequences, "questions")
        self.has_groups = _all_or_none(self.sequences, "interaction_ids")
        self._offsets = [seq.group_offsets for seq in self.sequences] if self.has_groups else None
        self.windows = [
            Window(i, start, end, score_from)
            for i, seq in enumerate(self.sequences)
            for start, end, score_from in (
                group_window_spans(seq.interaction_ids, max_len, stride)
                if self.has_groups
                else window_spans(len(seq), max_len, stride)
            )
        ]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
        w = self.windows[index]
        seq = self.sequences[w.sequence]
        scored = np.arange(w.start, w.end) >= w.score_from
        item = {
            "exercises": seq.exercises[w.start : w.end],
            "responses": seq.responses[w.start : w.end],
            "mask": scored,
            "index": index,
        }
        if self.has_questions:
            item["questions"] = seq.questions[w.start : w.end]
        if self._offsets is not None:
            item["group_offset"] = self._offsets[w.sequence][w.start : w.end]
        return item

    @property
    def num_interactions(self) -> int:
        """Interactions scored over the whole dataset (each interaction once)."""
        return sum(len(s) for s in self.sequences)


def _all_or_none(sequences: Sequence[StudentSequence], field: str) -> bool:
    """Whether the sequences have ``field`` (not ``None``); raises a ValueError when only some have it."""
    have = [getattr(seq, field) is not None for seq in sequences]
    if any(have) and not all(have):
        pos = have.index(not have[0])
        raise ValueError(
            f"Expected either every sequence or none to have `{field}` but sequence 0 {'has' if have[0] else 'lacks'}"
            f" them and sequence {pos} {'has' if have[pos] else 'lacks'} them."
        )
    return bool(have) and have[0]


_PADDED_KEYS = ("exercises", "responses", "mask", "questions", "group_offset")


def collate_kt(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Right-pad a list of dataset items to the longest one; padding is id 0 and ``mask`` False.

    ``questions`` and ``group_offset`` are padded with 0 too, when the items have them.
    """
    longest = max(len(item["exercises"]) for item in items)
    keys = [key for key in _PADDED_KEYS if key in items[0]]
    batch = {key: torch.zeros(len(items), longest, dtype=torch.bool if key == "mask" else torch.long) for key in keys}
    for row, item in enumerate(items):
        n = len(item["exercises"])
        for key in keys:
            batch[key][row, :n] = torch.from_numpy(np.asarray(item[key]))
    batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
    return batch


class LengthGroupedSampler(Sampler[int]):
    """A shuffled order in which every run of ``batch_size`` windows has similar lengths, so batches carry little
    padding (the idea of fairseq's and Hugging Face's ``group_by_length``).

    Each epoch: shuffle all windows (seeded by ``seed`` and the epoch), cut the order into groups of
    ``batch_size * group_batches`` windows, sort each group by length, cut it into batches, and shuffle the batches
    (a short final batch stays last, so that the DataLoader's batches line up with these). Every window appears
    once per epoch. Pass it as the DataLoader's ``sampler`` with the same ``batch_size``. Under DDP, Lightning wraps it
    and hands process ``r`` every ``W``-th index of this order, so each process's batches stay length-grouped too.

    The epoch advances by itself at every pass (``set_epoch`` sets it explicitly), so that the order changes every
    epoch also when a wrapper does not forward ``set_epoch``.

    Args:
        lengths: Length of every window.
        batch_size: Windows per batch.
        group_batches: Batches per sorted group; larger groups pad less and shuffle less.
        seed: Seed of the shuffles.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, group_batches: int = 50, seed: int = 0) -> None:
        if batch_size < 1 or group_batches < 1:
            raise ValueError(
                f"Expected `batch_size` and `group_batches` to be >= 1 but got {batch_size} and {group_batches}."
            )
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.group_batches = group_batches
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1
        order = rng.permutation(len(self.lengths))
        group = self.batch_size * self.group_batches
        batches = []
        for start in range(0, len(order), group):
            chunk = order[start : start + group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        for i in rng.permutation(len(full)):
            yield from full[i].tolist()
        for b in short:  # at most one (only the last group can end short); kept last so batches stay aligned
            yield from b.tolist()


def resolve_pin_memory(pin_memory: bool | None, trainer: L.Trainer | None) -> bool:
    """A DataLoader's ``pin_memory``: the user's choice, or (``None``) whether ``trainer`` trains on a CUDA GPU.

    Pinned (page-locked) batches let the host-to-GPU copy run asynchronously: Lightning's ``transfer_batch_to_device``
    already copies with ``non_blocking=True`` on CUDA, which overlaps with compute only from pinned memory. Decided
    when the loader is built, so a module attached to a GPU trainer later still gets pinned loaders.
    """
    if pin_memory is not None:
        return pin_memory
    return trainer is not None and isinstance(getattr(trainer, "accelerator", None), CUDAAccelerator)


def distributed_eval_sampler(dataset: Sized, trainer: L.Trainer | None) -> UnrepeatedDistributedSampler | None:
    """The sampler of an evaluation loader under DDP: each sample goes to exactly one process.

    Lightning replaces the sampler of a plain evaluation loader with a ``DistributedSampler``, which pads the dataset
    with repeated samples until every process gets as many; those samples are then counted twice in the metrics.
    Lightning keeps a loader's sampler when it already is a ``DistributedSampler``, so the data modules pass this one:
    process ``r`` of ``W`` reads samples ``r, r + W, r + 2W, ...`` in order, and some processes may run one batch
    fewer than others. That is safe because evaluation steps call no collective per batch: metrics are torchmetrics
    objects, gathered once in ``compute()`` (which accepts states of different sizes), and DDP syncs buffers only in
    its first forward after a training step (or its very first), which every process runs since each holds at least
    one sample.

    Args:
        dataset: The evaluation dataset.
        trainer: The trainer the data module is attached to (``self.trainer``); world size and rank come from it.

    Returns:
        The sampler, or ``None`` outside a distributed run (no trainer, or a world size of 1).

    Raises:
        ValueError: If the dataset holds fewer samples than there are processes.
    """
    if trainer is None or trainer.world_size <= 1:
        return None
    if len(dataset) < trainer.world_size:
        raise ValueError(
            f"Expected an evaluation set of at least as many samples as processes ({trainer.world_size}) but got"
            f" {len(dataset)}."
        )
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )


class KTDataModule(L.LightningDataModule):
    """Train/validation/test data for knowledge tracing, from a folder of files, from memory or simulated students.

    With ``data_dir`` the folder holds ``train.csv`` and ``test.csv`` (and optionally folds ``train{K}.csv`` /
    ``valid{K}.csv``) in the three-line format or as long tables. Validation is fold ``K`` when ``fold`` is set,
    otherwise a held-out fraction of the *students* of ``train.csv`` chosen with ``seed`` (a student never appears on
    both sides). The test set is never used for anything but testing and prediction.

    Without ``data_dir`` the data are simulated students (:func:`lit_kt.synthetic.generate_students`): half of
    ``synthetic_students`` for training (minus the validation fraction), half for testing. The simulator gives the
    oracle AUC on the test students (:meth:`oracle_auc`, the best any model can reach from the history) and the
    AUC of the true probabilities (:meth:`true_probability_auc`, an unreachable upper bound).

    With ``sequences`` (from Python; exclusive with ``data_dir``) the students are given in memory, each a
    :class:`~lit_kt.formats.StudentSequence` or an ``(exercises, responses)`` pair of integer sequences, NumPy arrays
    or tensors: either a list, the training students (validation is carved by ``val_fraction`` as from ``train.csv``;
    there is no test split, so ``test`` and ``predict`` raise an error), or a dict ``{"train": [...], "test": [...]}``
    with an optional ``"val"`` list (used as the validation split as it is: nothing is carved, ``val_fraction`` is
    ignored). Every student is checked when the module is built, and an error names it by its place in the input,
    e.g. ``sequences['test'][3]: Expected responses 0 or 1 but got 2 at position 5`` (0-based): lengths that differ,
    a student without interactions, values that are not integers (floats must be integral), ids below 1 or above
    ``max_exercise_id`` (or an explicit ``num_exercises``), responses other than 0/1. Nothing is dropped. The
    sequences are kept in memory, not in the hyperparameters (a checkpoint does not store them).

    ``limit`` keeps the first ``limit`` students of every split read from a file or given in memory (train, test and
    an explicit validation split: ``valid{K}.csv``, ``sequences["val"]``) and of the simulated training and test
    students; validation students held out by ``val_fraction`` are carved from the kept training students. Files are
    read and checked whole before the cut.

    Exercise ids: the model embeds ids ``1..num_exercises``. Without an explicit ``num_exercises`` it is the largest
    id of *all* splits (train, validation and test), so that every configuration that ran before still runs; ids
    of the validation or test split that never occur in the training split (and so keep their initial embeddings)
    are reported by a warning that counts them per split, e.g. ``test.csv: 3 exercise ids (12 interactions) never
    seen in training; they are scored with untrained embeddings``. An explicit ``num_exercises`` (``lit-kt`` sets it
    to the checkpoint's with ``--ckpt_path FILE``) must cover every file: a larger id is an :class:`ExerciseIdError`
    naming the file and the line of the first such interaction. So is an id above ``max_exercise_id``, a sanity
    bound checked right after reading, before anything is sized from the ids. In :meth:`setup`, when the trainer's
    module holds a model with ``num_exercises`` and ``max_len`` (:class:`~lit_kt.models.SAKT`), the ids of the
    stage's splits and this module's ``max_len`` are checked against it, before the first batch.

    Question-level data (``docs/kt_question_level.md``): with ``question_col`` (long tables), in-memory sequences
    that carry ``questions``, or ``synthetic_questions > 0``, batches carry ``questions`` and :attr:`num_questions`
    is the largest question id (or the explicit ``num_questions``); build a question-level model with it, e.g.
    ``AKT(num_exercises=dm.num_exercises, num_questions=dm.num_questions)`` (:meth:`model_sizes`; in a ``lit-kt``
    YAML set ``model.init_args.model.init_args.num_questions``, which is not linked because SAKT and DKT have no
    such argument). With ``concepts_col`` a multi-concept question is expanded into one row per concept and batches
    carry ``group_offset``; :class:`~lit_kt.KTModule` then scores each question once.

    Args:
        data_dir: Folder with ``train.csv`` and ``test.csv``; ``None`` for simulated students.
        format: ``"three_line"`` (count / ids / responses) or ``"long"`` (one interaction per row).
        fold: Use ``train{fold}.csv`` / ``valid{fold}.csv`` for training and validation.
        val_fraction: Fraction of training students held out for validation when ``fold`` is None (0 for none).
        max_len: Longest window fed to the model; longer sequences are cut into windows.
        eval_stride: Stride of validation/test/predict windows; ``None`` for non-overlapping windows.
        batch_size: Windows per batch (per process under DDP: the global batch is ``world_size * batch_size``).
        shuffle: Reshuffle the training windows every epoch (under DDP Lightning's ``DistributedSampler`` does it,
            seeded by ``seed_everything`` and the epoch). ``False`` keeps their order, also under DDP: process ``r``
            of ``W`` takes windows ``r, r + W, ...``, so ``W`` processes with ``batch_size`` ``b`` see, step by step,
            the same windows as one process with ``batch_size`` ``W * b``.
        group_by_length: Batch training windows of similar lengths together (:class:`LengthGroupedSampler`): far
            less padding, so more interactions per second when lengths vary (ASSIST2009, STATICS), at the price of
            less random batches. Needs ``shuffle``.
        num_workers: DataLoader worker processes; 0 collates batches in the training process, between steps. On a
            GPU a few workers (2 to 4) collate the next batches while the GPU runs the current step, so that the GPU
            does not wait for them; workers persist across epochs.
        seed: Seed of the validation split, of the simulated students and of ``group_by_length``'s shuffles.
        num_exercises: Number of exercise ids (ids ``1..num_exercises``); ``None`` for the largest id found in any
            split. An explicit value must be >= every id in the files read.
        max_exercise_id: Largest exercise id accepted in a file (a guard against, e.g., ids of 10**12 that would
            size embedding tables beyond any memory); raise it for data sets with more exercises.
        student_col: Long format: student column.
        exercise_col: Long format: exercise column.
        correct_col: Long format: correctness column.
        order_col: Long format: column to sort each student's rows by (``None`` keeps file order).
        question_col: Long format: question column (integer ids ``>= 1``), or ``None`` for concept-level data.
        concepts_col: Long format: column of ``concept_sep``-joined concept ids, read instead of ``exercise_col``
            (multi-concept questions are expanded, see :func:`~lit_kt.formats.read_long_table`); ``None`` for none.
        concept_sep: Long format: the separator of the concept ids in ``concepts_col`` (pyKT's ``"_"``).
        num_questions: Number of question ids (ids ``1..num_questions``); ``None`` for the largest question id
            found in any split (0 without questions). An explicit value must be >= every question id.
        synthetic_students: Simulated students in all (train + test).
        synthetic_exercises: Exercises of the simulated students.
        synthetic_concepts: Latent concepts of the simulated students.
        synthetic_seq_len: Interactions per simulated student.
        synthetic_questions: Questions of the simulated students (Rasch difficulties inside the exercises, see
            :func:`lit_kt.synthetic.generate_students`); 0 for exercise-level students without questions.
        sequences: In-memory students instead of ``data_dir`` (see above): a list of training students, or a dict
            with ``"train"`` and optionally ``"test"`` and ``"val"`` lists. Each student is a ``StudentSequence`` or an
            ``(exercises, responses)`` pair. Not stored in the hyperparameters.
        limit: Use only the first ``limit`` students (>= 1) of each split read or given (see above); ``None`` for
            all. A split with fewer students is kept whole.
        pin_memory: Pin the loaders' batches in page-locked host memory, so that their copy to the GPU runs
            asynchronously (:func:`resolve_pin_memory`); ``None`` pins when the attached trainer's accelerator is a
            CUDA GPU and not otherwise (pinning costs host time and gains nothing on CPU).

    Raises:
        ValueError: If an argument is out of range, ``data_dir`` and ``sequences`` are both given, ``fold`` is given
            with ``sequences``, or an in-memory student is invalid.
        TypeError: If ``sequences`` or one of its students has the wrong type.
        ExerciseIdError: If an in-memory exercise id is above ``max_exercise_id`` or an explicit ``num_exercises``.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        format: Literal["three_line", "long"] = "three_line",
        fold: int | None = None,
        val_fraction: float = 0.1,
        max_len: int = 100,
        eval_stride: int | None = None,
        batch_size: int = 64,
        shuffle: bool = True,
        group_by_length: bool = False,
        num_workers: int = 0,
        seed: int = 42,
        num_exercises: int | None = None,
        max_exercise_id: int = 10_000_000,
        student_col: str = "user_id",
        exercise_col: str = "skill_id",
        correct_col: str = "correct",
        order_col: str | None = "order_id",
        synthetic_students: int = 4000,
        synthetic_exercises: int = 50,
        synthetic_concepts: int = 5,
        synthetic_seq_len: int = 50,
        sequences: dict[str, list] | list | None = None,
        limit: int | None = None,
        question_col: str | None = None,
        concepts_col: str | None = None,
        concept_sep: str = "_",
        num_questions: int | None = None,
        synthetic_questions: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if num_questions is not None and num_questions < 0:
            raise ValueError(f"Expected `num_questions` to be >= 0 or None but got {num_questions}.")
        if synthetic_questions < 0:
            raise ValueError(f"Expected `synthetic_questions` to be >= 0 but got {synthetic_questions}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"Expected `val_fraction` to be in [0, 1) but got {val_fraction}.")
        if format not in ("three_line", "long"):
            raise ValueError(f"Expected `format` to be 'three_line' or 'long' but got {format!r}.")
        if group_by_length and not shuffle:
            raise ValueError("Expected `shuffle` to be True with `group_by_length` (it shuffles) but got False.")
        if num_exercises is not None and num_exercises < 1:
            raise ValueError(f"Expected `num_exercises` to be >= 1 or None but got {num_exercises}.")
        if max_exercise_id < 1:
            raise ValueError(f"Expected `max_exercise_id` to be >= 1 but got {max_exercise_id}.")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"Expected `limit` to be an int >= 1 or None but got {limit!r}.")
        if sequences is not None and data_dir is not None:
            raise ValueError(
                "Expected either `data_dir` (a folder of files) or `sequences` (in-memory students) but got both."
            )
        if sequences is not None and fold is not None:
            raise ValueError(
                f"Expected `fold` to be None with `sequences` (folds are files of `data_dir`; give a validation split"
                f" as sequences['val']) but got {fold}."
            )
        window_spans(1, max_len, eval_stride)  # validates max_len and eval_stride early
        self.save_hyperparameters(ignore=["sequences"])
        # In-memory students by split ("val" only when given), and each split's name in messages.
        self._memory_names: dict[str, str] = {}
        self._in_memory = None if sequences is None else self._parse_in_memory(sequences)
        self._origin: dict[str, list[int]] = {}  # in memory: each student's index in its input list, per split
        self._splits: dict[str, list[StudentSequence]] | None = None
        self._synthetic = None  # the simulated students, when there is no data_dir
        self._num_exercises: int | None = None
        self._sources: dict[str, Path | None] = {}  # the file each split comes from (None: simulated)
        self._largest: dict[str, int] = {}  # the largest exercise id of each split
        self._largest_question: dict[str, int] = {}  # the largest question id of each split (0 without questions)
        self._num_questions: int | None = None

    # ------------------------------------------------------------------ loading
    def _parse_in_memory(self, sequences: Any) -> dict[str, list[StudentSequence]]:
        """Validates the ``sequences`` argument; returns the students of each split given (see the class docstring)."""
        if isinstance(sequences, dict):
            keys = list(sequences)
            if "train" not in sequences or any(key not in _SPLITS for key in keys):
                raise ValueError(
                    "Expected `sequences` as a dict with a 'train' list and optionally 'test' and 'val' lists but got"
                    f" the keys {keys}."
                )
            named = {split: (f"sequences[{split!r}]", sequences[split]) for split in _SPLITS if split in sequences}
        elif isinstance(sequences, list | tuple):
            named = {"train": ("sequences", sequences)}
        else:
            raise TypeError(
                "Expected `sequences` to be a list of training students, a dict {'train': [...], 'test': [...],"
                f" 'val': [...]}} or None but got a {type(sequences).__name__}."
            )
        h = self.hparams
        splits = {}
        for split, (name, students) in named.items():
            if not isinstance(students, list | tuple):
                raise TypeError(
                    f"Expected `{name}` to be a list of students (StudentSequence or (exercises, responses) pairs) but"
                    f" got a {type(students).__name__}."
                )
            if not students and split != "val":
                raise ValueError(f"Expected at least one student in `{name}` but got an empty list.")
            splits[split] = [
                _in_memory_student(item, f"{name}[{i}]", h.max_exercise_id, h.num_exercises)
                for i, item in enumerate(students)
            ]
            self._memory_names[split] = name
        return splits

    def _limit(self, students: list) -> list:
        """The first ``limit`` students (all of them when ``limit`` is None)."""
        return students if self.hparams.limit is None else students[: self.hparams.limit]

    def _read(self, name: str) -> list[StudentSequence]:
        path = Path(self.hparams.data_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"Expected a data file at {path} but it does not exist.")
        h = self.hparams
        if h.format == "three_line":
            sequences = read_three_line(path)
        else:
            sequences = read_long_table(
                path,
                h.student_col,
                h.exercise_col,
                h.correct_col,
                h.order_col,
                question_col=h.question_col,
                concepts_col=h.concepts_col,
                concept_sep=h.concept_sep,
            )
        largest = max((int(s.exercises.max()) for s in sequences), default=0)
        if h.num_exercises is not None and largest > h.num_exercises:
            self._raise_id_above(
                path,
                h.num_exercises,
                f"Expected `num_exercises` ({h.num_exercises}) to be >= the largest exercise id in the data (the"
                " model embeds ids 1..num_exercises)",
            )
        if largest > h.max_exercise_id:
            self._raise_id_above(
                path,
                h.max_exercise_id,
                f"Expected exercise ids <= `max_exercise_id` ({h.max_exercise_id}, a sanity bound: the embedding"
                " tables have a row per id)",
                "; number the exercises 1..N or raise `--data.max_exercise_id`",
            )
        return sequences

    def _raise_id_above(self, path: Path, bound: int, expected: str, suffix: str = "") -> None:
        """Raises an :class:`ExerciseIdError` at the first interaction of ``path`` with an id above ``bound``.

        The message reads ``"<expected> but got exercise id <id><suffix>"``.
        """
        h = self.hparams
        found = find_exercise_above(
            path, bound, h.format, h.exercise_col, concepts_col=h.concepts_col, concept_sep=h.concept_sep
        )
        line, exercise = found if found is not None else (None, f"above {bound}")
        raise ExerciseIdError(path, line, f"{expected} but got exercise id {exercise}{suffix}")

    def _split_off_validation(self, train: list[StudentSequence]) -> tuple[list, list]:
        n_val = int(round(len(train) * self.hparams.val_fraction))
        if self.hparams.val_fraction > 0 and n_val == 0:
            n_val = 1
        if n_val >= len(train):
            raise ValueError(
                f"Expected `val_fraction` ({self.hparams.val_fraction}) to leave training students but the training"
                f" split has only {len(train)}."
            )
        order = np.random.default_rng(self.hparams.seed).permutation(len(train))
        val_ids = set(order[:n_val].tolist())
        return [s for i, s in enumerate(train) if i not in val_ids], [s for i, s in enumerate(train) if i in val_ids]

    def _load(self) -> dict[str, list[StudentSequence]]:
        if self._splits is not None:
            return self._splits
        h = self.hparams
        if h.data_dir is None and self._in_memory is None:
            from lit_kt.synthetic import generate_students

            sim = generate_students(
                num_students=h.synthetic_students,
                num_exercises=h.synthetic_exercises,
                num_concepts=h.synthetic_concepts,
                seq_len=h.synthetic_seq_len,
                seed=h.seed,
                num_questions=h.synthetic_questions,
            )
            half = h.synthetic_students // 2
            train, test = self._limit(sim.sequences[half:]), self._limit(sim.sequences[:half])  # test first
            self._synthetic = sim
            train, val = self._split_off_validation(train)
            self._sources = {"train": None, "val": None, "test": None}
        elif self._in_memory is not None:
            memory = self._in_memory
            train, test = self._limit(memory["train"]), self._limit(memory.get("test", []))
            self._origin = {"train": list(range(len(train))), "test": list(range(len(test)))}
            if "val" in memory:
                val = self._limit(memory["val"])
                self._origin["val"] = list(range(len(val)))
            else:  # carve the indices, so that messages can name a validation student by its training index
                kept, held = self._split_off_validation(self._origin["train"])
                train, val = [train[i] for i in kept], [train[i] for i in held]
                self._origin.update(train=kept, val=held)
            self._sources = {"train": None, "val": None, "test": None}
        elif h.fold is not None:
            train = self._limit(self._read(f"train{h.fold}.csv"))
            val, test = self._limit(self._read(f"valid{h.fold}.csv")), self._limit(self._read("test.csv"))
            root = Path(h.data_dir)
            self._sources = {"train": root / f"train{h.fold}.csv", "val": root / f"valid{h.fold}.csv"}
            self._sources["test"] = root / "test.csv"
        else:
            train, test = self._limit(self._read("train.csv")), self._limit(self._read("test.csv"))
            train, val = self._split_off_validation(train)
            root = Path(h.data_dir)
            self._sources = {"train": root / "train.csv", "val": root / "train.csv", "test": root / "test.csv"}
        splits = {"train": train, "val": val, "test": test}
        self._largest = {name: max((int(s.exercises.max()) for s in seqs), default=0) for name, seqs in splits.items()}
        # An explicit num_exercises was checked against every file as it was read (`_read`); simulated ids here.
        worst = max(self._largest, key=self._largest.get)
        simulated = h.data_dir is None and self._in_memory is None  # in-memory ids were checked in __init__
        if simulated and h.num_exercises is not None and self._largest[worst] > h.num_exercises:
            raise ValueError(
                f"Expected `num_exercises` to be >= the largest exercise id in the data ({self._largest[worst]}, in"
                f" {self._describe(worst)}) but got {h.num_exercises}."
            )
        self._num_exercises = max(self._largest.values()) if h.num_exercises is None else h.num_exercises
        self._largest_question = {
            name: max((int(s.questions.max()) for s in seqs if s.questions is not None), default=0)
            for name, seqs in splits.items()
        }
        worst = max(self._largest_question, key=self._largest_question.get)
        largest_question = self._largest_question[worst]
        if h.num_questions is not None and largest_question > h.num_questions:
            raise ValueError(
                f"Expected `num_questions` to be >= the largest question id in the data ({largest_question}, in"
                f" {self._describe(worst)}) but got {h.num_questions}."
            )
        self._num_questions = max(self._largest_question.values()) if h.num_questions is None else h.num_questions
        self._warn_unseen(splits)
        self._splits = splits
        return splits

    def _describe(self, split: str) -> str:
        """Where a split's students come from, for messages."""
        if self._in_memory is not None:
            if split not in self._in_memory:
                return f"the validation students held out from `{self._memory_names['train']}`"
            return f"`{self._memory_names[split]}`"
        source = self._sources.get(split)
        if source is None:
            return f"the simulated {'validation' if split == 'val' else split} students"
        if split == "val" and self.hparams.fold is None:
            return f"the validation students held out from {source}"
        return str(source)

    def _warn_unseen(self, splits: dict[str, list[StudentSequence]]) -> None:
        """Warns, per split, about validation/test exercise ids that never occur in the training split."""
        if not splits["train"]:
            return
        seen = np.unique(np.concatenate([s.exercises for s in splits["train"]]))
        for split in ("val", "test"):
            if not splits[split]:
                continue
            exercises = np.concatenate([s.exercises for s in splits[split]])
            unseen = ~np.isin(exercises, seen)
            if not unseen.any():
                continue
            ids = np.unique(exercises[unseen])
            message = (
                f"{self._describe(split)}: {len(ids)} exercise id{'s' if len(ids) != 1 else ''}"
                f" ({int(unseen.sum())} interaction{'s' if unseen.sum() != 1 else ''}) never seen in training; they"
                " are scored with untrained embeddings"
            )
            above = int((ids > self._largest["train"]).sum())
            if above and self.hparams.num_exercises is None:
                message += (
                    f" ({above} of them above the training split's largest id, {self._largest['train']}, yet"
                    f" counted in `num_exercises`, {self._num_exercises})"
                )
            rank_zero_warn(message + ".")

    @property
    def num_exercises(self) -> int:
        """Number of exercise ids the model must embed (ids 1..num_exercises)."""
        self._load()
        return self._num_exercises

    @property
    def num_questions(self) -> int:
        """Number of question ids a question-level model must embed (ids 1..num_questions); 0 without questions."""
        self._load()
        return self._num_questions

    def model_sizes(self) -> dict[str, int]:
        """``{"num_exercises", "num_questions"}`` of the data, to build a model: ``AKT(**dm.model_sizes(), ...)``.

        Pass ``num_questions`` only to models that take it (:class:`~lit_kt.models.AKT`); SAKT and DKT do not.
        """
        return {"num_exercises": self.num_exercises, "num_questions": self.num_questions}

    def sequences(self, split: Literal["train", "val", "test"]) -> list[StudentSequence]:
        """The students of one split, before windowing."""
        return self._load()[split]

    def oracle_auc(self, use_questions: bool = True) -> float | None:
        """Best test AUC any model can reach in expectation (simulated students only; ``None`` for files).

        The AUC of the Bayes-optimal predictions on the test students: the posterior predictive of the true
        simulator given each student's history (:meth:`lit_kt.SyntheticStudents.oracle_probabilities`).

        Args:
            use_questions: With ``synthetic_questions``, use the questions' difficulties (the ceiling); ``False``
                gives the question-blind reference that knows only the exercises' difficulties.
        """
        return self._reference_auc(lambda sim: sim.oracle_probabilities(use_questions=use_questions))

    def true_probability_auc(self) -> float | None:
        """Test AUC of the simulator's true probabilities: an upper bound no model reaches (``None`` for files)."""
        return self._reference_auc(lambda sim: sim.probabilities)

    def _reference_auc(self, probabilities) -> float | None:
        self._load()
        if self._synthetic is None:
            return None
        from lit_kt.synthetic import roc_auc

        test = self.sequences("test")
        probs = np.concatenate(probabilities(self._synthetic)[: len(test)])  # the test students come first
        return roc_auc(probs, np.concatenate([s.responses for s in test]))

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        splits = self._load()
        h = self.hparams
        if stage in ("test", "predict"):
            self._require_test(stage)
        self._check_model(stage)
        self.train_set = KTDataset(splits["train"], h.max_len)
        self.val_set = KTDataset(splits["val"], h.max_len, h.eval_stride)
        self.test_set = KTDataset(splits["test"], h.max_len, h.eval_stride)

    def _check_model(self, stage: str | None) -> None:
        """Checks the ids and ``max_len`` of the data against the model of the attached trainer, if any.

        Raises:
            ExerciseIdError: If a split the stage reads holds an id above the model's ``num_exercises``.
            ValueError: If ``max_len`` is above the model's ``max_len``.
        """
        module = self.trainer.lightning_module if self.trainer is not None else None
        model = getattr(module, "model", None)
        check_max_len(self.hparams.max_len, getattr(model, "max_len", None))
        num_exercises = getattr(model, "num_exercises", None)
        if not isinstance(num_exercises, int):
            return
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        num_questions = getattr(model, "num_questions", None)
        for split in splits.get(stage, ("train", "val", "test")):
            if isinstance(num_questions, int) and 0 < num_questions < self._largest_question.get(split, 0):
                raise ValueError(
                    f"Expected question ids <= the model's `num_questions` ({num_questions}, it embeds ids"
                    f" 1..num_questions) in {self._describe(split)} but got question id"
                    f" {self._largest_question[split]}; build the model with the data module's `num_questions`"
                    f" ({self._num_questions})."
                )
            if self._largest.get(split, 0) <= num_exercises:
                continue
            expected = (
                f"Expected exercise ids <= the model's `num_exercises` ({num_exercises}, it embeds ids"
                f" 1..num_exercises) in {self._describe(split)}"
            )
            source = self._sources.get(split)
            if source is None and self._in_memory is not None:
                self._raise_in_memory_above(split, num_exercises, expected)
            if source is None:
                raise ValueError(f"{expected} but got exercise id {self._largest[split]}.")
            self._raise_id_above(source, num_exercises, expected)

    def _raise_in_memory_above(self, split: str, bound: int, expected: str) -> None:
        """Raises an :class:`ExerciseIdError` naming the first in-memory student of ``split`` with an id above
        ``bound`` by its index in the input (e.g. ``sequences['train'][7]``) and the position of the id."""
        name = self._memory_names[split if split in self._in_memory else "train"]
        for j, student in enumerate(self._splits[split]):
            high = student.exercises > bound
            if high.any():
                pos = int(np.argmax(high))
                raise ExerciseIdError(
                    f"{name}[{self._origin[split][j]}]",
                    None,
                    f"{expected} but got exercise id {int(student.exercises[pos])} at position {pos}",
                )

    def _require_test(self, stage: str) -> None:
        """Raises a ValueError when in-memory data without a test split are asked for the test students."""
        if self._in_memory is not None and "test" not in self._in_memory:
            raise ValueError(
                f"Expected test students for `{stage}` but `sequences` has none: pass a dict"
                " {'train': [...], 'test': [...]} to test or predict."
            )

    def _sampler(self, dataset: KTDataset, train: bool) -> Sampler | None:
        if not train:
            return distributed_eval_sampler(dataset, self.trainer)
        if self.hparams.group_by_length:
            lengths = [w.end - w.start for w in dataset.windows]
            return LengthGroupedSampler(lengths, self.hparams.batch_size, seed=self.hparams.seed)
        if self.hparams.shuffle or self.trainer is None or self.trainer.world_size <= 1:
            return None  # a plain loader; under DDP Lightning adds a shuffling DistributedSampler
        # Lightning shuffles every training loader it distributes, even with shuffle=False: keep the order.
        return DistributedSampler(
            dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )

    def _loader(self, dataset: KTDataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=train and self.hparams.shuffle and not self.hparams.group_by_length,
            sampler=self._sampler(dataset, train),
            num_workers=self.hparams.num_workers,
            collate_fn=collate_kt,
            pin_memory=resolve_pin_memory(self.hparams.pin_memory, self.trainer),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False) if len(self.val_set) else []

    def test_dataloader(self) -> DataLoader:
        self._require_test("test")
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        self._require_test("predict")
        return self._loader(self.test_set, train=False)
