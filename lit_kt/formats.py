"""Readers and a writer for knowledge-tracing interaction data.

Two on-disk layouts are supported, both read into a list of :class:`StudentSequence` (one per student, interactions
in time order, exercise ids ``>= 1`` because ``0`` is reserved for padding, responses ``0``/``1``).

**Three-line format** (DKVMN / SAKT benchmark files such as ``assist2009/train.csv``): every student takes three
consecutive lines::

    5                 <- number of attempts L
    12,12,7,31,7      <- L comma-separated exercise ids (1-based)
    0,1,1,0,1         <- L comma-separated responses (0 = wrong, 1 = right)

A trailing comma at the end of the id and response lines is allowed (``1,2,3,``), whitespace around values is
ignored, and blank lines are tolerated at the end of the file only. :func:`read_three_line` checks, and reports
with the file name and 1-based line number:

* the file is not empty and its last record is complete (three lines);
* no blank line occurs before the end of the file;
* the count line is a non-negative integer, is not ``0`` (a student without interactions is a data error) and equals
  the number of exercise ids on the next line;
* every exercise id is an integer ``>= 1`` (an empty field such as ``1,,2`` is an error);
* every response is ``0`` or ``1`` and there are as many responses as exercise ids.

**Long table** (one interaction per row, the shape of raw ASSISTments CSV exports), read with :mod:`csv` and a header
row, for example::

    order_id,user_id,skill_id,correct
    33,u1,12,1
    35,u2,7,0

:func:`read_long_table` groups rows by the student column (students in order of first appearance) and sorts each
student's rows stably by the order column (file order when there is none). It checks that the header names every
required column, that student ids are non-empty, exercise ids are integers ``>= 1``, correctness values are exactly
``0`` or ``1`` and order values are finite numbers. For question-level data it also reads a question column and a
multi-concept column (concept ids joined by ``"_"``, as pyKT writes them, e.g. ``3_17``), expanding a question with
``k`` concepts into ``k`` rows (see :func:`read_long_table` and ``docs/kt_question_level.md``). Line numbers are
physical line numbers (the header is line 1; for a quoted field spanning several lines, the line on which the row ends).

:func:`write_three_line` writes sequences in the three-line format (without trailing commas), so that
``read_three_line`` reads them back unchanged.

Every data problem raises :class:`KTFormatError`, a :class:`ValueError` whose message starts with ``"<path>:<line>: "``
and reads ``"Expected ... but got ..."``.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

__all__ = [
    "KTFormatError",
    "StudentSequence",
    "find_exercise_above",
    "read_long_table",
    "read_three_line",
    "write_three_line",
]

# Whole-line fast-path patterns: a comma-separated list of non-negative integers (resp. 0/1), optional trailing comma.
_UINT_LIST = re.compile(r"\s*[0-9]+\s*(?:,\s*[0-9]+\s*)*,?\s*")
_BINARY_LIST = re.compile(r"\s*[01]\s*(?:,\s*[01]\s*)*,?\s*")
_INT = re.compile(r"[+-]?[0-9]+")
_UINT = re.compile(r"[0-9]+")
_INT64_MAX = np.iinfo(np.int64).max


def _to_int(text: str) -> int:
    """``int(text)`` for text matching ``_INT``, free of Python's limit on the digits of a conversion.

    A value beyond int64 comes back as ``_INT64_MAX + 1`` (or its negative), which every reader rejects anyway.
    """
    if len(text.lstrip("+-").lstrip("0")) > 19:
        return -(_INT64_MAX + 1) if text.startswith("-") else _INT64_MAX + 1
    return int(text)


@dataclass(frozen=True, eq=False)
class StudentSequence:
    """One student's interactions in time order.

    The constructor converts the arrays to ``int64`` (without copying when they already are). ``frozen`` prevents
    rebinding the attributes; the arrays themselves are ordinary writable NumPy arrays that should be treated as
    read-only. Two sequences are equal when their arrays (``None`` equal to ``None`` only) are element-wise equal and
    their students are equal. Sequences are not hashable.

    Question-level data (see ``docs/kt_question_level.md``): ``questions`` gives the question of every row, and
    ``interaction_ids`` records the pyKT-style expansion of multi-concept questions: a question attempt tagged with
    ``k`` concepts is stored as ``k`` consecutive rows (one per concept, in the order given) sharing the question, the
    response and the interaction id. Without ``interaction_ids`` every row is its own interaction.

    Attributes:
        exercises: ``(L,)`` int64 exercise (concept) ids, each ``>= 1`` (``0`` is reserved for padding).
        responses: ``(L,)`` int64 responses, each ``0`` or ``1``.
        student: Student identifier, or ``None`` when the format has none (three-line files).
        questions: ``(L,)`` int64 question ids, each ``>= 1``, or ``None`` for concept-level data.
        interaction_ids: ``(L,)`` int64, the 0-based index of the original interaction each row was expanded from:
            ``0`` at the first row, then each row equal to the previous one (another concept of the same question)
            or one more (the next interaction). Rows sharing an id share their response and question. ``None``: no
            expansion (``interaction_ids == arange(L)``).
    """

    exercises: np.ndarray
    responses: np.ndarray
    student: str | None = None
    questions: np.ndarray | None = None
    interaction_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Converts the arrays to int64 and validates shapes and values.

        Raises:
            ValueError: If an array is not integer-valued, not 1-D, the lengths differ, an exercise or question id
                is ``< 1``, a response is not ``0`` or ``1``, or ``interaction_ids`` does not start at 0 and step by
                0 or 1, or differs in response or question inside one interaction.
        """
        exercises = _as_int64_vector(self.exercises, "exercises")
        responses = _as_int64_vector(self.responses, "responses")
        if exercises.shape != responses.shape:
            raise ValueError(
                f"Expected exercises and responses of equal length but got {exercises.shape[0]} exercises "
                f"and {responses.shape[0]} responses"
            )
        if exercises.size and exercises.min() < 1:
            pos = int(np.argmax(exercises < 1))
            raise ValueError(
                f"Expected exercise ids >= 1 (0 is reserved for padding) but got {int(exercises[pos])} at index {pos}"
            )
        if responses.size and ((responses != 0) & (responses != 1)).any():
            pos = int(np.argmax((responses != 0) & (responses != 1)))
            raise ValueError(f"Expected responses 0 or 1 but got {int(responses[pos])} at index {pos}")
        questions = None if self.questions is None else _as_int64_vector(self.questions, "questions")
        if questions is not None:
            if questions.shape != exercises.shape:
                raise ValueError(
                    f"Expected questions of the length of exercises ({exercises.shape[0]}) but got {questions.shape[0]}"
                )
            if questions.size and questions.min() < 1:
                pos = int(np.argmax(questions < 1))
                raise ValueError(
                    f"Expected question ids >= 1 (0 is reserved for padding) but got {int(questions[pos])} at index "
                    f"{pos}"
                )
        groups = None if self.interaction_ids is None else _as_int64_vector(self.interaction_ids, "interaction_ids")
        if groups is not None:
            _check_interaction_ids(groups, exercises.shape[0], responses, questions)
        object.__setattr__(self, "exercises", exercises)
        object.__setattr__(self, "responses", responses)
        object.__setattr__(self, "questions", questions)
        object.__setattr__(self, "interaction_ids", groups)

    def __len__(self) -> int:
        """Returns the number of interactions L."""
        return int(self.exercises.shape[0])

    def __eq__(self, other: object) -> bool:
        """Compares arrays element-wise and the student identifier."""
        if not isinstance(other, StudentSequence):
            return NotImplemented
        return (
            self.student == other.student
            and np.array_equal(self.exercises, other.exercises)
            and np.array_equal(self.responses, other.responses)
            and _optional_equal(self.questions, other.questions)
            and _optional_equal(self.interaction_ids, other.interaction_ids)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable array contents

    @property
    def group_offsets(self) -> np.ndarray:
        """``(L,)`` int64, each row's 0-based position among the rows of its interaction (0: the first concept row).

        All zeros without ``interaction_ids``.
        """
        if self.interaction_ids is None:
            return np.zeros(len(self), dtype=np.int64)
        first = np.flatnonzero(np.r_[True, np.diff(self.interaction_ids) != 0])  # (I,) first row of each interaction
        return np.arange(len(self), dtype=np.int64) - np.repeat(first, np.diff(np.r_[first, len(self)]))


def _optional_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _check_interaction_ids(
    groups: np.ndarray, length: int, responses: np.ndarray, questions: np.ndarray | None
) -> None:
    """Raises a ValueError unless ``groups`` are valid interaction ids (see :class:`StudentSequence`)."""
    if groups.shape[0] != length:
        raise ValueError(f"Expected interaction_ids of the length of exercises ({length}) but got {groups.shape[0]}")
    if not length:
        return
    if groups[0] != 0:
        raise ValueError(f"Expected interaction_ids to start at 0 but got {int(groups[0])} at index 0")
    step = np.diff(groups)
    if ((step != 0) & (step != 1)).any():
        pos = int(np.argmax((step != 0) & (step != 1))) + 1
        raise ValueError(
            f"Expected each interaction id to equal the previous one or exceed it by 1 but got {int(groups[pos])}"
            f" after {int(groups[pos - 1])} at index {pos}"
        )
    same = step == 0
    for name, values in (("responses", responses), ("questions", questions)):
        if values is None:
            continue
        bad = same & (values[1:] != values[:-1])
        if bad.any():
            pos = int(np.argmax(bad)) + 1
            raise ValueError(
                f"Expected equal {name} within an interaction (rows expanded from one question) but got "
                f"{int(values[pos - 1])} and {int(values[pos])} at indices {pos - 1} and {pos} (interaction "
                f"{int(groups[pos])})"
            )


def _as_int64_vector(values: object, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size and arr.dtype.kind not in "iub":
        raise ValueError(f"Expected integer {name} but got an array of dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"Expected 1-D {name} but got an array of shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


class FileFormatError(ValueError):
    """Raised for a malformed data file; the base of :class:`KTFormatError`.

    The message starts with ``"<path>:<line>: "`` (1-based line number), or ``"<path>: "`` when the problem concerns
    the file as a whole (e.g. it is empty).

    Attributes:
        path: The file, as given to the reader.
        line: The 1-based line number, or ``None``.
        message: The description without the location prefix.
    """

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        """Builds the error.

        Args:
            path: The file in which the problem was found.
            line: The 1-based line number, or ``None`` for a problem with the whole file.
            message: What was expected and what was found.
        """
        self.path = path
        self.line = line
        self.message = message
        location = os.fspath(path) if line is None else f"{os.fspath(path)}:{line}"
        super().__init__(f"{location}: {message}")

    def __reduce__(self):  # keep the error picklable (e.g. raised inside DataLoader workers)
        return (type(self), (self.path, self.line, self.message))


def csv_rows(reader, path: str | os.PathLike, error: type[FileFormatError] = FileFormatError):
    """Yield the rows of a ``csv.reader``/``DictReader``, turning a ``csv.Error`` into ``error`` at its line."""
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            raise error(path, reader.line_num, f"Expected a well-formed CSV row but got a CSV error: {e}") from e
        yield row


class KTFormatError(FileFormatError):
    """Raised for malformed knowledge-tracing data (message ``"<path>:<line>: ..."``; see :class:`FileFormatError`)."""


def undecodable_error(
    path: str | os.PathLike[str], exc: UnicodeDecodeError, error: type[FileFormatError] = FileFormatError
) -> FileFormatError:
    """The format error for a file that is not valid UTF-8, at the first line holding an invalid byte sequence.

    The decoder's offset is relative to a buffered chunk, so the file is read again in binary and decoded line by
    line (lines end at ``\\n``, ``\\r`` or ``\\r\\n``, as the readers count them).

    Args:
        path: The file that failed to decode.
        exc: The decoding error.
        error: The error class to build.

    Returns:
        The error (for the caller to raise), naming the file, the 1-based line and the offending bytes.
    """
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError:
        lines = []
    for number, raw in enumerate(lines, start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return error(
                path,
                number,
                f"Expected UTF-8 text but got the bytes {raw[e.start : e.end]!r} at byte {e.start + 1} of the line"
                f" ({e.reason})",
            )
    return error(path, None, f"Expected UTF-8 text but got an undecodable byte sequence ({exc.reason})")


@contextlib.contextmanager
def open_text(
    path: str | os.PathLike[str], error: type[FileFormatError] = FileFormatError, newline: str | None = None
) -> Iterator[TextIO]:
    """Opens a UTF-8 file (a byte-order mark is skipped) whose decoding errors become ``error`` at their line."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            yield f
    except UnicodeDecodeError as e:
        raise undecodable_error(path, e, error) from e


# ---------------------------------------------------------------------------------------------------------------------
# Three-line format
# ---------------------------------------------------------------------------------------------------------------------


def read_three_line(path: str | os.PathLike[str]) -> list[StudentSequence]:
    """Reads a file in the three-line format.

    Args:
        path: The file to read (UTF-8; a byte-order mark is ignored).

    Returns:
        One :class:`StudentSequence` per record, in file order, with ``student=None``.

    Raises:
        KTFormatError: If the file is empty or malformed (see the module docstring); the message names the file and
            the 1-based line number.
        OSError: If the file cannot be read.
    """
    with open_text(path, KTFormatError) as f:
        lines = f.read().split("\n")
    n = len(lines)
    while n and not lines[n - 1].strip():
        n -= 1
    if n == 0:
        raise KTFormatError(path, None, "Expected at least one student record but got an empty file")

    def nonblank(k: int) -> str:
        text = lines[k]
        if not text.strip():
            raise KTFormatError(
                path,
                k + 1,
                "Expected a non-blank line (blank lines are allowed only at the end of the file) but got a blank line",
            )
        return text

    sequences: list[StudentSequence] = []
    for i in range(0, n, 3):
        count_text = nonblank(i).strip()
        if not _UINT.fullmatch(count_text):
            raise KTFormatError(
                path, i + 1, f"Expected a non-negative integer count of attempts but got {count_text!r}"
            )
        count = _to_int(count_text)
        if count > _INT64_MAX:
            raise KTFormatError(path, i + 1, f"Expected a count of attempts that fits in int64 but got {count_text!r}")
        if count == 0:
            raise KTFormatError(path, i + 1, "Expected at least one interaction but got a count of 0")
        if i + 3 > n:
            for k in range(i + 1, n):
                nonblank(k)
            have = n - i
            raise KTFormatError(
                path,
                i + 1,
                "Expected 3 lines for this student record (count, exercise ids, responses) "
                f"but got {have} line{'s' if have != 1 else ''} before the end of the file",
            )
        exercises = _parse_ids(path, i + 2, nonblank(i + 1))
        if len(exercises) != count:
            raise KTFormatError(
                path,
                i + 1,
                f"Expected {count} exercise ids on line {i + 2} (the count on this line) but got {len(exercises)}",
            )
        responses = _parse_responses(path, i + 3, nonblank(i + 2))
        if len(responses) != len(exercises):
            raise KTFormatError(
                path,
                i + 3,
                f"Expected {len(exercises)} responses (one per exercise id on line {i + 2}) but got {len(responses)}",
            )
        sequences.append(StudentSequence(exercises, responses))
    return sequences


def _split_fields(text: str) -> list[str]:
    fields = text.split(",")
    if len(fields) > 1 and not fields[-1].strip():
        fields.pop()  # one trailing comma is allowed
    return fields


def _parse_ids(path: str | os.PathLike[str], line: int, text: str) -> np.ndarray:
    fields = _split_fields(text)
    if _UINT_LIST.fullmatch(text):
        values = [_to_int(f.strip()) for f in fields]
        if max(values) <= _INT64_MAX:
            ids = np.array(values, dtype=np.int64)
            if ids.min() >= 1:
                return ids
    # Slow path: find the first offending field.
    for pos, field in enumerate(fields, start=1):
        value = field.strip()
        if not _INT.fullmatch(value):
            found = "an empty field" if not value else repr(value)
            raise KTFormatError(path, line, f"Expected an integer exercise id at field {pos} but got {found}")
        number = _to_int(value)
        if number < 1:
            raise KTFormatError(
                path, line, f"Expected an exercise id >= 1 (0 is reserved for padding) at field {pos} but got {value!r}"
            )
        if number > _INT64_MAX:
            raise KTFormatError(
                path, line, f"Expected an exercise id that fits in int64 at field {pos} but got {value!r}"
            )
    raise KTFormatError(path, line, f"Expected comma-separated exercise ids but got {text.strip()!r}")  # unreachable


def _parse_responses(path: str | os.PathLike[str], line: int, text: str) -> np.ndarray:
    fields = _split_fields(text)
    if _BINARY_LIST.fullmatch(text):
        return np.array([int(f) for f in fields], dtype=np.int64)
    for pos, field in enumerate(fields, start=1):
        value = field.strip()
        if value not in ("0", "1"):
            found = "an empty field" if not value else repr(value)
            raise KTFormatError(path, line, f"Expected a response 0 or 1 at field {pos} but got {found}")
    raise KTFormatError(path, line, f"Expected comma-separated responses but got {text.strip()!r}")  # unreachable


def write_three_line(sequences: Iterable[StudentSequence], path: str | os.PathLike[str]) -> None:
    """Writes sequences in the three-line format.

    Lines are ``\\n``-terminated and carry no trailing commas. Student identifiers are not stored by the format and
    are dropped. All sequences are checked before the file is opened, so a failed call leaves no partial file.

    Args:
        sequences: The sequences to write, in order.
        path: The file to create or overwrite.

    Raises:
        ValueError: If a sequence is empty (the format, and :func:`read_three_line`, require at least one
            interaction per student), or carries ``questions`` or ``interaction_ids``, which the format cannot hold
            (rather than dropping them, the call fails: rebuild the sequences without them to write concepts only).
        OSError: If the file cannot be written.
    """
    sequences = list(sequences)
    for k, seq in enumerate(sequences):
        if len(seq) == 0:
            raise ValueError(f"Expected at least one interaction per sequence but sequence {k} is empty")
        if seq.questions is not None or seq.interaction_ids is not None:
            raise ValueError(
                f"Expected sequences without questions or interaction_ids (the three-line format stores exercise ids"
                f" and responses only) but sequence {k} has them"
            )
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for seq in sequences:
            f.write(f"{len(seq)}\n")
            f.write(",".join(map(str, seq.exercises.tolist())))
            f.write("\n")
            f.write(",".join(map(str, seq.responses.tolist())))
            f.write("\n")


# ---------------------------------------------------------------------------------------------------------------------
# Long table
# ---------------------------------------------------------------------------------------------------------------------


def read_long_table(
    path: str | os.PathLike[str],
    student_col: str = "user_id",
    exercise_col: str = "skill_id",
    correct_col: str = "correct",
    order_col: str | None = "order_id",
    delimiter: str = ",",
    question_col: str | None = None,
    concepts_col: str | None = None,
    concept_sep: str = "_",
) -> list[StudentSequence]:
    """Reads a table with one interaction per row and a header row.

    Rows are grouped by student, students in order of first appearance. Within a student, rows are sorted stably by
    the order column (integers compare exactly, other numbers as floats), or kept in file order when ``order_col``
    is ``None``. Other columns are ignored; blank lines are skipped; header names are stripped of surrounding
    whitespace.

    Question-level data: ``question_col`` adds each row's question id (an integer ``>= 1``) as
    :attr:`StudentSequence.questions`. ``concepts_col`` replaces ``exercise_col``: it holds the concepts of the
    row's question joined by ``concept_sep`` (pyKT's ``"_"``, e.g. ``"3_17"``; one concept is just ``"3"``), each an
    integer ``>= 1``, no two equal. Such a row is *expanded* as pyKT does: a question with ``k`` concepts becomes
    ``k`` consecutive rows, one per concept in the order written, with the same question and response, and the
    sequence's :attr:`StudentSequence.interaction_ids` tells which rows come from one table row (set whenever
    ``concepts_col`` is given). Without ``concepts_col`` the reader returns exactly what it returned before.

    Args:
        path: The file to read (UTF-8; a byte-order mark is ignored).
        student_col: Column holding the student id (any non-empty string).
        exercise_col: Column holding the exercise id (an integer ``>= 1``; ``"12.0"`` is rejected); not read when
            ``concepts_col`` is given.
        correct_col: Column holding the response, exactly ``"0"`` or ``"1"``.
        order_col: Column holding a number (e.g. an id or timestamp) giving the time order, or ``None``.
        delimiter: Field delimiter, e.g. ``"\\t"`` for TSV.
        question_col: Column holding the question id (an integer ``>= 1``), or ``None`` for concept-level data.
        concepts_col: Column holding the ``concept_sep``-joined concept ids of the row's question, or ``None`` to
            read one exercise id per row from ``exercise_col``.
        concept_sep: Separator of the concept ids in ``concepts_col`` (non-empty, not the field delimiter).

    Returns:
        One :class:`StudentSequence` per student, with ``student`` set to the (stripped) student id, ``questions``
        set with ``question_col`` and ``interaction_ids`` set with ``concepts_col``.

    Raises:
        KTFormatError: If the file is empty, has no data rows, lacks a required column, or a value is invalid; the
            message names the file and the 1-based physical line number.
        OSError: If the file cannot be read.
    """
    if not concept_sep or concept_sep == delimiter:
        raise ValueError(
            f"Expected `concept_sep` to be a non-empty string other than the delimiter ({delimiter!r}) but got"
            f" {concept_sep!r}."
        )
    id_col = exercise_col if concepts_col is None else concepts_col
    required = [student_col, id_col, correct_col] + [col for col in (order_col, question_col) if col is not None]
    # Per student: exercise ids (a list of concept ids per row with concepts_col), responses, orders, questions.
    groups: dict[str, tuple[list, list[int], list[int | float], list[int]]] = {}
    with open_text(path, KTFormatError, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            header = reader.fieldnames
        except csv.Error as e:
            raise KTFormatError(path, reader.line_num or 1, f"Expected a CSV header row but got a CSV error: {e}")
        if header is None:
            raise KTFormatError(path, None, "Expected a header row but got an empty file")
        header_line = reader.line_num
        header = [name.strip() for name in header]
        reader.fieldnames = header
        missing = [col for col in required if col not in header]
        if missing:
            raise KTFormatError(
                path,
                header_line,
                f"Expected column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))} in the header but got columns {header}",
            )

        def value(row: dict[str | None, object], col: str, line: int, what: str) -> str:
            raw = row.get(col)
            if raw is None:
                raise KTFormatError(
                    path,
                    line,
                    f"Expected {what} in column {col!r} but got a missing field "
                    f"(the row has fewer fields than the header)",
                )
            return str(raw).strip()

        for row in csv_rows(reader, path, KTFormatError):
            line = reader.line_num

            student = value(row, student_col, line, "a student id")
            if not student:
                raise KTFormatError(
                    path, line, f"Expected a non-empty student id in column {student_col!r} but got an empty field"
                )

            if concepts_col is None:
                exercise = _parse_id(path, line, value(row, exercise_col, line, "an exercise id"), exercise_col)
            else:
                exercise = _parse_concepts(
                    path, line, value(row, concepts_col, line, "concept ids"), concepts_col, concept_sep
                )
            question = 0
            if question_col is not None:
                question = _parse_id(
                    path, line, value(row, question_col, line, "a question id"), question_col, "question"
                )

            correct_text = value(row, correct_col, line, "a response")
            if correct_text not in ("0", "1"):
                found = "an empty field" if not correct_text else repr(correct_text)
                raise KTFormatError(path, line, f"Expected 0 or 1 in column {correct_col!r} but got {found}")

            order: int | float = 0
            if order_col is not None:
                order_text = value(row, order_col, line, "an order value")
                order = _parse_order(order_text)
                if order is None:
                    found = "an empty field" if not order_text else repr(order_text)
                    raise KTFormatError(path, line, f"Expected a finite number in column {order_col!r} but got {found}")

            group = groups.get(student)
            if group is None:
                group = groups[student] = ([], [], [], [])
            group[0].append(exercise)
            group[1].append(int(correct_text))
            group[2].append(order)
            group[3].append(question)

    if not groups:
        raise KTFormatError(path, header_line, "Expected at least one data row after the header but got none")

    sequences = []
    for student, (exercises, responses, orders, questions) in groups.items():
        if order_col is not None:
            perm = sorted(range(len(orders)), key=orders.__getitem__)  # sorted() is stable
            exercises = [exercises[k] for k in perm]
            responses = [responses[k] for k in perm]
            questions = [questions[k] for k in perm]
        if concepts_col is None:
            sequences.append(
                StudentSequence(
                    np.array(exercises, dtype=np.int64),
                    np.array(responses, dtype=np.int64),
                    student,
                    questions=None if question_col is None else np.array(questions, dtype=np.int64),
                )
            )
            continue
        counts = np.array([len(concepts) for concepts in exercises], dtype=np.int64)  # (I,) concepts per row
        sequences.append(
            StudentSequence(
                np.array([c for concepts in exercises for c in concepts], dtype=np.int64),  # (L,) expanded rows
                np.repeat(np.array(responses, dtype=np.int64), counts),
                student,
                questions=None if question_col is None else np.repeat(np.array(questions, dtype=np.int64), counts),
                interaction_ids=np.repeat(np.arange(len(counts), dtype=np.int64), counts),
            )
        )
    return sequences


def _parse_id(path: str | os.PathLike[str], line: int, text: str, col: str, what: str = "exercise") -> int:
    """An integer id ``>= 1`` that fits in int64 read from column ``col``, else a :class:`KTFormatError`."""
    if not _INT.fullmatch(text) or _to_int(text) < 1:
        found = "an empty field" if not text else repr(text)
        raise KTFormatError(path, line, f"Expected an integer {what} id >= 1 in column {col!r} but got {found}")
    number = _to_int(text)
    if number > _INT64_MAX:
        article = "an" if what[0] in "aeiou" else "a"
        raise KTFormatError(
            path, line, f"Expected {article} {what} id that fits in int64 in column {col!r} but got {text!r}"
        )
    return number


def _parse_concepts(path: str | os.PathLike[str], line: int, text: str, col: str, sep: str) -> list[int]:
    """The distinct concept ids of a ``sep``-joined field (e.g. ``"3_17"``), else a :class:`KTFormatError`."""
    concepts = []
    for pos, field in enumerate(text.split(sep), start=1):
        field = field.strip()
        if not _INT.fullmatch(field) or _to_int(field) < 1 or _to_int(field) > _INT64_MAX:
            found = "an empty field" if not field else repr(field)
            raise KTFormatError(
                path,
                line,
                f"Expected {sep!r}-separated integer concept ids >= 1 (that fit in int64) in column {col!r} but got"
                f" {found} as concept {pos} of {text!r}",
            )
        concept = _to_int(field)
        if concept in concepts:
            raise KTFormatError(
                path, line, f"Expected distinct concept ids in column {col!r} but got {concept} twice in {text!r}"
            )
        concepts.append(concept)
    return concepts


def _parse_order(text: str) -> int | float | None:
    """Parses an order value: an exact int when possible, else a finite float; ``None`` when invalid."""
    if _INT.fullmatch(text):
        with contextlib.suppress(ValueError):  # beyond Python's digit limit: read as a float below (inf: invalid)
            return int(text)
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# ---------------------------------------------------------------------------------------------------------------------
# Locating an interaction
# ---------------------------------------------------------------------------------------------------------------------


def find_exercise_above(
    path: str | os.PathLike[str],
    bound: int,
    format: str = "three_line",
    exercise_col: str = "skill_id",
    delimiter: str = ",",
    concepts_col: str | None = None,
    concept_sep: str = "_",
) -> tuple[int, int] | None:
    """Finds the first interaction of a file whose exercise id is above ``bound``.

    :class:`StudentSequence` does not keep line numbers (a long table's rows are even reordered); this rescan of a
    file that already read without error gives the line to report when an id is out of range, so that the common
    path pays nothing for it.

    Args:
        path: A file that :func:`read_three_line` or :func:`read_long_table` read without error.
        bound: The largest allowed exercise id.
        format: ``"three_line"`` or ``"long"``.
        exercise_col: Long table: the exercise column.
        delimiter: Long table: the field delimiter.
        concepts_col: Long table: the multi-concept column read instead of ``exercise_col``, or ``None``.
        concept_sep: Long table: the separator of the concept ids in ``concepts_col``.

    Returns:
        ``(line, exercise_id)`` with the 1-based physical line of the first such id in file order (for a three-line
        file, its line of ids), or ``None`` when every id is ``<= bound``.

    Raises:
        ValueError: If ``format`` is neither ``"three_line"`` nor ``"long"``.
        OSError: If the file cannot be read.
    """
    if format == "three_line":
        with open_text(path, KTFormatError) as f:
            lines = f.read().split("\n")
        for k in range(1, len(lines), 3):  # the id line of every record
            if not lines[k].strip():
                break  # the blank lines at the end of the file
            ids = _parse_ids(path, k + 1, lines[k])
            if ids.max() > bound:
                return k + 1, int(ids[np.argmax(ids > bound)])
        return None
    if format != "long":
        raise ValueError(f"Expected `format` to be 'three_line' or 'long' but got {format!r}.")
    with open_text(path, KTFormatError, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        for row in reader:
            if concepts_col is None:
                ids = [int(str(row[exercise_col]).strip())]
            else:
                ids = [int(field) for field in str(row[concepts_col]).split(concept_sep)]
            for exercise in ids:
                if exercise > bound:
                    return reader.line_num, exercise
    return None
