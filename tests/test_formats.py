"""Tests for lit_kt.formats: three-line and long-table readers, the three-line writer and their error messages."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from lit_kt.formats import KTFormatError, StudentSequence, read_long_table, read_three_line, write_three_line


def _write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _at(path: Path, line: int | None) -> str:
    """Regex matching the location prefix of a KTFormatError message."""
    return "^" + re.escape(f"{path}:{line}: " if line is not None else f"{path}: ")


def _expect_error(path: Path, line: int | None, *fragments: str, reader=read_three_line, **kwargs) -> KTFormatError:
    with pytest.raises(KTFormatError, match=_at(path, line)) as info:
        reader(path, **kwargs)
    err = info.value
    assert err.line == line
    assert err.path == path
    for fragment in fragments:
        assert fragment in str(err), f"{fragment!r} not in {str(err)!r}"
    return err


def _arrays(seqs: list[StudentSequence]) -> list[tuple[list[int], list[int], str | None]]:
    return [(s.exercises.tolist(), s.responses.tolist(), s.student) for s in seqs]


# ---------------------------------------------------------------------------------------------------------------------
# StudentSequence
# ---------------------------------------------------------------------------------------------------------------------


def test_student_sequence_converts_and_compares():
    seq = StudentSequence([3, 1, 2], np.array([0, 1, 1], dtype=np.int8), "s1")
    assert len(seq) == 3
    assert seq.exercises.dtype == np.int64 and seq.responses.dtype == np.int64
    assert seq == StudentSequence(np.array([3, 1, 2]), np.array([0, 1, 1]), "s1")
    assert seq != StudentSequence(np.array([3, 1, 2]), np.array([0, 1, 0]), "s1")
    assert seq != StudentSequence(np.array([3, 1, 2]), np.array([0, 1, 1]), None)


@pytest.mark.parametrize(
    ("exercises", "responses", "match"),
    [
        ([1, 2, 3], [0, 1], "equal length"),
        ([[1, 2]], [[0, 1]], "1-D"),
        ([0, 1], [0, 1], ">= 1"),
        ([1, 2], [0, 2], "0 or 1"),
        ([1.5, 2.0], [0, 1], "integer"),
    ],
)
def test_student_sequence_rejects_bad_input(exercises, responses, match):
    with pytest.raises(ValueError, match=match):
        StudentSequence(np.array(exercises), np.array(responses))


def test_error_is_value_error_and_picklable(tmp_path):
    err = KTFormatError(tmp_path / "x.csv", 7, "Expected a but got b")
    assert isinstance(err, ValueError)
    assert str(err) == f"{tmp_path / 'x.csv'}:7: Expected a but got b"
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.line, copy.path) == (str(err), 7, err.path)


# ---------------------------------------------------------------------------------------------------------------------
# Three-line format: happy paths
# ---------------------------------------------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    seqs = [
        StudentSequence(np.array([5, 1, 5, 110]), np.array([1, 0, 0, 1])),
        StudentSequence(np.array([7]), np.array([1])),
        StudentSequence(np.array([2, 3]), np.array([0, 0])),
    ]
    path = tmp_path / "out.csv"
    write_three_line(iter(seqs), path)
    assert path.read_text() == "4\n5,1,5,110\n1,0,0,1\n1\n7\n1\n2\n2,3\n0,0\n"
    back = read_three_line(path)
    assert back == seqs
    assert all(s.exercises.dtype == np.int64 and s.responses.dtype == np.int64 for s in back)


def test_write_drops_student_and_rejects_empty(tmp_path):
    path = tmp_path / "out.csv"
    write_three_line([StudentSequence(np.array([1]), np.array([0]), "alice")], path)
    assert read_three_line(path) == [StudentSequence(np.array([1]), np.array([0]))]

    other = tmp_path / "empty.csv"
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        write_three_line(
            [StudentSequence(np.array([1]), np.array([0])), StudentSequence(np.array([], np.int64), np.array([]))],
            other,
        )
    assert not other.exists()


def test_read_trailing_commas_whitespace_and_blank_end(tmp_path):
    path = _write(tmp_path, "3\n1,2,3,\n0,1,1,\n 2 \n 10 , 4 \r\n1 ,0\n\n\n  \n")
    seqs = read_three_line(path)
    assert _arrays(seqs) == [([1, 2, 3], [0, 1, 1], None), ([10, 4], [1, 0], None)]
    assert [len(s) for s in seqs] == [3, 2]


def test_read_without_final_newline(tmp_path):
    path = _write(tmp_path, "1\n4\n1")
    assert _arrays(read_three_line(path)) == [([4], [1], None)]


# ---------------------------------------------------------------------------------------------------------------------
# Three-line format: errors
# ---------------------------------------------------------------------------------------------------------------------

GOOD = "3\n1,2,3\n0,1,1\n"  # lines 1-3; the bad record in the tests below starts on line 4


@pytest.mark.parametrize("text", ["", "\n\n", "  \n"])
def test_empty_file(tmp_path, text):
    path = _write(tmp_path, text)
    _expect_error(path, None, "Expected at least one student record", "empty file")


def test_truncated_record(tmp_path):
    path = _write(tmp_path, GOOD + "2\n4,5\n")
    _expect_error(path, 4, "Expected 3 lines", "but got 2 lines")


def test_truncated_record_count_only(tmp_path):
    path = _write(tmp_path, GOOD + "2\n")
    _expect_error(path, 4, "Expected 3 lines", "but got 1 line ")


@pytest.mark.parametrize("count", ["abc", "-2", "2.0"])
def test_bad_count(tmp_path, count):
    path = _write(tmp_path, GOOD + f"{count}\n4,5\n0,1\n")
    _expect_error(path, 4, "Expected a non-negative integer count", f"but got {count!r}")


def test_zero_count(tmp_path):
    path = _write(tmp_path, GOOD + "0\n4\n1\n")
    _expect_error(path, 4, "Expected at least one interaction")


def test_count_mismatch(tmp_path):
    path = _write(tmp_path, GOOD + "3\n4,5\n0,1\n")
    _expect_error(path, 4, "Expected 3 exercise ids on line 5", "but got 2")


def test_length_mismatch(tmp_path):
    path = _write(tmp_path, GOOD + "2\n4,5\n0,1,1\n")
    _expect_error(path, 6, "Expected 2 responses", "but got 3")


@pytest.mark.parametrize(
    ("ids", "field", "found"),
    [
        ("4,3.5", 2, "'3.5'"),
        ("abc,4", 1, "'abc'"),
        ("4,,5", 2, "an empty field"),
        ("4,5,,", 3, "an empty field"),
    ],
)
def test_non_integer_id(tmp_path, ids, field, found):
    path = _write(tmp_path, GOOD + f"2\n{ids}\n0,1\n")
    _expect_error(path, 5, f"Expected an integer exercise id at field {field}", f"but got {found}")


def test_negative_id(tmp_path):
    path = _write(tmp_path, GOOD + "2\n4,-1\n0,1\n")
    _expect_error(path, 5, "Expected an exercise id >= 1", "at field 2", "but got '-1'")


def test_zero_id(tmp_path):
    path = _write(tmp_path, GOOD + "3\n4,5,0,\n0,1,1,\n")
    _expect_error(path, 5, "Expected an exercise id >= 1 (0 is reserved for padding) at field 3", "but got '0'")


@pytest.mark.parametrize(("responses", "field", "found"), [("0,2", 2, "'2'"), ("1.0,1", 1, "'1.0'"), (",1", 1, None)])
def test_bad_response(tmp_path, responses, field, found):
    path = _write(tmp_path, GOOD + f"2\n4,5\n{responses}\n")
    _expect_error(path, 6, f"Expected a response 0 or 1 at field {field}", f"but got {found or 'an empty field'}")


def test_blank_line_inside(tmp_path):
    path = _write(tmp_path, GOOD + "\n2\n4,5\n0,1\n")
    _expect_error(path, 4, "Expected a non-blank line", "but got a blank line")


def test_blank_line_inside_record(tmp_path):
    path = _write(tmp_path, GOOD + "2\n\n4,5\n0,1\n")
    _expect_error(path, 5, "Expected a non-blank line", "but got a blank line")


def test_first_error_is_reported(tmp_path):
    path = _write(tmp_path, "2\n1,x\n0,1\n2\n1,y\n0,1\n")
    _expect_error(path, 2, "'x'")


# ---------------------------------------------------------------------------------------------------------------------
# Long table
# ---------------------------------------------------------------------------------------------------------------------

TABLE = """order_id,user_id,skill_id,correct,extra
30,u2,7,1,a
10,u1,12,0,b
5,u2,8,0,c
20,u1,3,1,d
10,u1,4,1,e
"""


def test_long_table_groups_and_sorts(tmp_path):
    path = _write(tmp_path, TABLE)
    seqs = read_long_table(path)
    # u2 appears first; within each student rows are sorted by order_id, ties (u1: 10, 10) keep file order.
    assert _arrays(seqs) == [([8, 7], [0, 1], "u2"), ([12, 4, 3], [0, 1, 1], "u1")]


def test_long_table_without_order_keeps_file_order(tmp_path):
    path = _write(tmp_path, TABLE)
    seqs = read_long_table(path, order_col=None)
    assert _arrays(seqs) == [([7, 8], [1, 0], "u2"), ([12, 3, 4], [0, 1, 1], "u1")]


def test_long_table_numeric_order_not_lexicographic(tmp_path):
    path = _write(tmp_path, "order_id,user_id,skill_id,correct\n10,u,1,1\n9.5,u,2,0\n-1e3,u,3,1\n100,u,4,0\n")
    assert _arrays(read_long_table(path)) == [([3, 2, 1, 4], [1, 0, 1, 0], "u")]


def test_long_table_custom_columns_and_tab(tmp_path):
    text = "time\tstudent\tproblem\tok\n2.5\ts 1\t9\t1\n1.0\ts 1\t4\t0\n3\tX\t4\t1\n\n"
    path = _write(tmp_path, text, "data.tsv")
    seqs = read_long_table(
        path, student_col="student", exercise_col="problem", correct_col="ok", order_col="time", delimiter="\t"
    )
    assert _arrays(seqs) == [([4, 9], [0, 1], "s 1"), ([4], [1], "X")]


def test_long_table_missing_column(tmp_path):
    path = _write(tmp_path, "user_id,skill,correct\nu1,3,1\n")
    err = _expect_error(
        path,
        1,
        "Expected columns 'skill_id', 'order_id' in the header",
        "['user_id', 'skill', 'correct']",
        reader=read_long_table,
    )
    assert "but got columns" in err.message


def test_long_table_missing_column_without_order(tmp_path):
    path = _write(tmp_path, "user_id,skill_id\nu1,3\n")
    _expect_error(path, 1, "Expected column 'correct'", reader=read_long_table, order_col=None)


@pytest.mark.parametrize("value", ["2", "1.0", "true", ""])
def test_long_table_bad_correct(tmp_path, value):
    path = _write(tmp_path, f"order_id,user_id,skill_id,correct\n1,u1,3,1\n2,u1,4,{value}\n")
    found = repr(value) if value else "an empty field"
    _expect_error(path, 3, "Expected 0 or 1 in column 'correct'", f"but got {found}", reader=read_long_table)


@pytest.mark.parametrize("value", ["12.0", "abc", "", "0", "-4"])
def test_long_table_bad_exercise(tmp_path, value):
    path = _write(tmp_path, f"order_id,user_id,skill_id,correct\n1,u1,3,1\n\n2,u1,{value},1\n")
    found = repr(value) if value else "an empty field"
    # The blank line 3 is skipped but still counted: the bad row is physical line 4.
    _expect_error(
        path, 4, "Expected an integer exercise id >= 1 in column 'skill_id'", f"but got {found}", reader=read_long_table
    )


@pytest.mark.parametrize("value", ["abc", "nan", ""])
def test_long_table_bad_order(tmp_path, value):
    path = _write(tmp_path, f"order_id,user_id,skill_id,correct\n{value},u1,3,1\n")
    _expect_error(path, 2, "Expected a finite number in column 'order_id'", reader=read_long_table)


def test_long_table_empty_student_and_short_row(tmp_path):
    path = _write(tmp_path, "order_id,user_id,skill_id,correct\n1, ,3,1\n")
    _expect_error(path, 2, "Expected a non-empty student id", reader=read_long_table)
    path = _write(tmp_path, "order_id,user_id,skill_id,correct\n1,u1,3\n")
    _expect_error(path, 2, "Expected a response in column 'correct'", "missing field", reader=read_long_table)


def test_long_table_empty(tmp_path):
    path = _write(tmp_path, "")
    _expect_error(path, None, "Expected a header row", "empty file", reader=read_long_table)


def test_long_table_header_only(tmp_path):
    path = _write(tmp_path, "order_id,user_id,skill_id,correct\n")
    _expect_error(path, 1, "Expected at least one data row", reader=read_long_table)


def test_long_table_round_trip_through_three_line(tmp_path):
    seqs = read_long_table(_write(tmp_path, TABLE))
    out = tmp_path / "out.csv"
    write_three_line(seqs, out)
    back = read_three_line(out)
    assert [(s.exercises.tolist(), s.responses.tolist()) for s in back] == [
        (s.exercises.tolist(), s.responses.tolist()) for s in seqs
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Real data (the shared_data fixture, from tests/conftest.py, skips when ../shared/data is absent)
# ---------------------------------------------------------------------------------------------------------------------


def test_real_assist2009(shared_data):
    seqs = read_three_line(shared_data / "kt/assist2009/train.csv")
    assert len(seqs) == 2921
    assert sum(map(len, seqs)) == 224218
    assert max(int(s.exercises.max()) for s in seqs) == 110
    assert min(int(s.exercises.min()) for s in seqs) >= 1


def test_real_synthetic(shared_data):
    seqs = read_three_line(shared_data / "kt/synthetic/train.csv")
    assert len(seqs) == 2000
    assert all(len(s) == 50 for s in seqs)
    assert all(s.exercises.tolist() == list(range(1, 51)) for s in seqs[:5])
