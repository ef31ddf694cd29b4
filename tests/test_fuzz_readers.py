"""Fuzzing the file readers: any input gives parsed data or the package's format error naming the file and the line.

Inputs are (a) random bytes and text and (b) valid three-line, long-table and SST-2 files with random mutations:
byte flips, deletions and insertions, duplicated, removed or swapped lines, random Unicode, NUL and non-UTF-8 bytes,
huge, negative and empty numbers, extra columns, stray delimiters and quotes. Readers must never raise another
exception type (``UnicodeDecodeError``, a bare ``ValueError`` from ``int()``, ``csv.Error``, ``IndexError``, ...).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lit_kd._files import FileFormatError as KDFileFormatError
from lit_kd.data import TextFormatError, read_labelled_text, read_unlabelled_text
from lit_kt.formats import FileFormatError as KTFileFormatError
from lit_kt.formats import KTFormatError, StudentSequence, read_long_table, read_three_line

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,  # no .hypothesis/ folder in the working directory
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the fuzzed files (``@given`` tests cannot take the function-scoped ``tmp_path``)."""
    return tmp_path_factory.mktemp("fuzz")


_counter = itertools.count()


def write(folder: Path, data: bytes, suffix: str) -> Path:
    """Writes ``data`` to a fresh file of ``folder`` with the given extension."""
    path = folder / f"f{next(_counter)}{suffix}"
    path.write_bytes(data)
    return path


def outcome(read: Callable[[Path], object], path: Path, error: type[Exception]) -> object | None:
    """Runs ``read(path)``; returns its result, or ``None`` after checking that a format error names file and line.

    Any exception other than ``error`` propagates and fails the test (hypothesis then shrinks the input).
    """
    try:
        return read(path)
    except error as e:
        message = str(e)
        assert e.path == path
        n_lines = len(path.read_bytes().splitlines())
        if e.line is None:
            assert message.startswith(f"{os.fspath(path)}: "), message
        else:
            assert message.startswith(f"{os.fspath(path)}:{e.line}: "), message
            assert 1 <= e.line <= max(n_lines, 1), (e.line, n_lines, message)
        assert e.message and message.endswith(e.message)
        return None


def check_sequences(result: object) -> None:
    """Parsed knowledge-tracing data obeys the documented invariants."""
    assert isinstance(result, list) and result
    for seq in result:
        assert isinstance(seq, StudentSequence)
        assert len(seq) >= 1
        assert seq.exercises.min() >= 1
        assert set(seq.responses.tolist()) <= {0, 1}


def check_texts(texts: object) -> None:
    """Parsed texts are non-empty and stripped."""
    assert isinstance(texts, list) and texts
    for text in texts:
        assert isinstance(text, str) and text and text == text.strip()


# ---------------------------------------------------------------------------------------------------------------------
# Valid files
# ---------------------------------------------------------------------------------------------------------------------

ids = st.integers(1, 300)
bits = st.integers(0, 1)
newlines = st.sampled_from(["\n", "\r\n"])
bom = st.sampled_from(["", "\ufeff"])
# Texts of a TSV cell (QUOTE_NONE): no tab or line break, not blank after stripping.
cell_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\t\r\n"), min_size=1, max_size=30
).filter(lambda t: t.strip())


@st.composite
def three_line_files(draw) -> bytes:
    """A valid three-line file (optional trailing commas, spaces, CRLF, BOM and trailing blank lines)."""
    nl, trailing = draw(newlines), draw(st.sampled_from(["", ","]))
    lines = []
    for _ in range(draw(st.integers(1, 5))):
        exercises = draw(st.lists(ids, min_size=1, max_size=8))
        responses = draw(st.lists(bits, min_size=len(exercises), max_size=len(exercises)))
        sep = draw(st.sampled_from([",", ", "]))
        lines += [str(len(exercises)), sep.join(map(str, exercises)) + trailing, sep.join(map(str, responses))]
    return (draw(bom) + nl.join(lines) + nl * draw(st.integers(0, 2))).encode("utf-8")


@st.composite
def long_table_files(draw) -> bytes:
    """A valid long table with columns ``order_id,user_id,skill_id,correct`` (in some order, plus an extra one)."""
    columns = draw(st.permutations(["order_id", "user_id", "skill_id", "correct", "extra"]))
    nl = draw(newlines)
    rows = [",".join(columns)]
    for order in range(draw(st.integers(1, 12))):
        values = {
            "order_id": str(draw(st.sampled_from([order, order * 2.5, -order]))),
            "user_id": draw(st.sampled_from(["u1", "u2", "7", '"u,3"'])),
            "skill_id": str(draw(ids)),
            "correct": str(draw(bits)),
            "extra": draw(st.sampled_from(["", "x", '"a ""q"""'])),
        }
        rows.append(",".join(values[c] for c in columns))
    return (draw(bom) + nl.join(rows) + nl).encode("utf-8")


@st.composite
def sst2_files(draw) -> bytes:
    """A valid SST-2 ``sentence<TAB>label`` file (texts may hold quotes, commas and any printable Unicode)."""
    nl = draw(newlines)
    rows = ["sentence\tlabel"]
    for _ in range(draw(st.integers(1, 8))):
        rows.append(f"{draw(cell_text)}\t{draw(bits)}")
    return (draw(bom) + nl.join(rows) + nl).encode("utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------------------------------

NON_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80"]
HUGE = ["9" * 19, "9223372036854775808", "1" + "0" * 400, "7" * 5000, "1e999", "-1e999", "nan", "inf"]
NUMBERS = ["-1", "-0", "0", "+1", "00001", "-9223372036854775809", "1.0", "1_000", "٣", "１", "0x1F"]
FIELDS = ["", " ", '"', '""', "\t", ",", "\x00", "\x1c", "\u2028", "\x85", "\ufeff", "\r", "\n", "é", "🙂"]


@st.composite
def mutate(draw, data: bytes) -> bytes:
    """Applies 1 to 4 random mutations to ``data``."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(
                [
                    "flip",
                    "delete",
                    "insert_bytes",
                    "insert_text",
                    "non_utf8",
                    "nul",
                    "number",
                    "empty_field",
                    "extra_column",
                    "dup_line",
                    "drop_line",
                    "swap_lines",
                    "truncate",
                ]
            )
        )
        at = draw(st.integers(0, len(buf)))
        if op == "flip" and buf:
            at = min(at, len(buf) - 1)
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete":
            del buf[at : at + draw(st.integers(1, 8))]
        elif op == "insert_bytes":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "insert_text":
            buf[at:at] = draw(st.one_of(st.text(min_size=1, max_size=8), st.sampled_from(FIELDS))).encode("utf-8")
        elif op == "non_utf8":
            buf[at:at] = draw(st.sampled_from(NON_UTF8))
        elif op == "nul":
            buf[at:at] = b"\x00" * draw(st.integers(1, 3))
        elif op in ("number", "empty_field", "extra_column"):
            # Replace the field under `at` (delimited by , TAB or a line break), or append a column to its line.
            start = max((buf.rfind(c, 0, at) for c in (b",", b"\t", b"\n")), default=-1) + 1
            ends = [e for e in (buf.find(c, at) for c in (b",", b"\t", b"\r", b"\n")) if e >= 0]
            end = min(ends) if ends else len(buf)
            if op == "number":
                buf[start:end] = draw(st.sampled_from(HUGE + NUMBERS)).encode()
            elif op == "empty_field":
                buf[start:end] = b""
            else:
                line_end = buf.find(b"\n", at)
                line_end = len(buf) if line_end < 0 else line_end
                if line_end and buf[line_end - 1 : line_end] == b"\r":
                    line_end -= 1
                buf[line_end:line_end] = draw(st.sampled_from([b",", b"\t"])) + draw(st.sampled_from([b"", b"7", b"x"]))
        else:
            lines = bytes(buf).split(b"\n")
            k = draw(st.integers(0, len(lines) - 1))
            if op == "dup_line":
                lines.insert(k, lines[k])
            elif op == "drop_line":
                del lines[k]
            elif op == "swap_lines":
                j = draw(st.integers(0, len(lines) - 1))
                lines[k], lines[j] = lines[j], lines[k]
            else:  # truncate
                lines = lines[:k]
            buf = bytearray(b"\n".join(lines))
    return bytes(buf)


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid files from ``valid`` with random mutations."""
    return valid.flatmap(mutate)


random_input = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=300).map(lambda t: t.encode("utf-8")),
    st.text(alphabet="0123456789,\t\n\r -\"'x\x00", max_size=300).map(lambda t: t.encode("utf-8")),
)

KT_READERS: dict[str, Callable[[Path], list[StudentSequence]]] = {
    "three_line": read_three_line,
    "long": read_long_table,
    "long_tsv": lambda p: read_long_table(p, delimiter="\t"),
    "long_unordered": lambda p: read_long_table(p, order_col=None),
}
KD_READERS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "labelled_tsv": (".tsv", read_labelled_text),
    "labelled_csv": (".csv", read_labelled_text),
    "labelled_3": (".tsv", lambda p: read_labelled_text(p, num_labels=3)),
    "unlabelled_tsv": (".tsv", read_unlabelled_text),
    "unlabelled_csv": (".csv", read_unlabelled_text),
    "unlabelled_txt": (".txt", read_unlabelled_text),
}


def run_kt(fuzz_dir: Path, data: bytes, reader: str) -> None:
    """Feeds ``data`` to a knowledge-tracing reader and checks the outcome."""
    result = outcome(KT_READERS[reader], write(fuzz_dir, data, ".csv"), KTFormatError)
    if result is not None:
        check_sequences(result)


def run_kd(fuzz_dir: Path, data: bytes, reader: str) -> None:
    """Feeds ``data`` to a text reader (as a file with that reader's extension) and checks the outcome."""
    suffix, read = KD_READERS[reader]
    result = outcome(read, write(fuzz_dir, data, suffix), TextFormatError)
    if result is None:
        return
    if reader.startswith("labelled"):
        texts, labels = result
        check_texts(texts)
        assert len(labels) == len(texts) and all(isinstance(y, int) and y >= 0 for y in labels)
        if reader == "labelled_3":
            assert max(labels) < 3
    else:
        check_texts(result)


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def test_error_hierarchy() -> None:
    """Both packages' format errors are ``ValueError`` subclasses of their ``FileFormatError``."""
    assert issubclass(KTFormatError, KTFileFormatError) and issubclass(KTFileFormatError, ValueError)
    assert issubclass(TextFormatError, KDFileFormatError) and issubclass(KDFileFormatError, ValueError)


@FUZZ
@given(data=st.one_of(random_input, three_line_files(), long_table_files()), reader=st.sampled_from(list(KT_READERS)))
@example(data=b"1\n1\n1\n\xff", reader="three_line")
def test_kt_readers_random_input(fuzz_dir: Path, data: bytes, reader: str) -> None:
    """Random bytes and text, and valid files, fed to the knowledge-tracing readers."""
    run_kt(fuzz_dir, data, reader)


@FUZZ
@given(data=mutated(three_line_files()))
@example(data=b"2\n1,\x1c2\n0,1\n")
@example(data=b"1\n" + b"7" * 5000 + b"\n1\n")
@example(data=b"7" * 5000 + b"\n1\n1\n")
def test_three_line_mutated(fuzz_dir: Path, data: bytes) -> None:
    """Mutated three-line files."""
    run_kt(fuzz_dir, data, "three_line")


@FUZZ
@given(data=mutated(long_table_files()), reader=st.sampled_from(["long", "long_unordered"]))
@example(data=b"order_id,user_id,skill_id,correct\n" + b"7" * 5000 + b",u,1,1\n", reader="long")
@example(data=b"order_id,user_id,skill_id,correct\n1,u," + b"7" * 5000 + b",1\n", reader="long")
def test_long_table_mutated(fuzz_dir: Path, data: bytes, reader: str) -> None:
    """Mutated long tables, with and without the order column."""
    run_kt(fuzz_dir, data, reader)


@FUZZ
@given(data=st.one_of(random_input, sst2_files()), reader=st.sampled_from(list(KD_READERS)))
@example(data=b"sentence\tlabel\n\xffbad\t1\n", reader="unlabelled_txt")
@example(data=b'"' + b"a" * 200_000 + b'"\n', reader="unlabelled_csv")
def test_kd_readers_random_input(fuzz_dir: Path, data: bytes, reader: str) -> None:
    """Random bytes and text, and valid SST-2 files, fed to the text readers (.tsv, .csv and plain text)."""
    run_kd(fuzz_dir, data, reader)


@FUZZ
@given(data=mutated(sst2_files()), reader=st.sampled_from(list(KD_READERS)))
@example(data=b"sentence\tlabel\nok\t" + b"7" * 5000 + b"\n", reader="labelled_tsv")
@example(data=b"sentence\tlabel\nok\t99999999999999999999\n", reader="labelled_tsv")
def test_sst2_mutated(fuzz_dir: Path, data: bytes, reader: str) -> None:
    """Mutated SST-2 files, read as labelled and as unlabelled text."""
    run_kd(fuzz_dir, data, reader)


# ---------------------------------------------------------------------------------------------------------------------
# The fuzzer's findings, pinned
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "read, suffix, error",
    [
        (read_three_line, ".csv", KTFormatError),
        (read_long_table, ".csv", KTFormatError),
        (read_labelled_text, ".tsv", TextFormatError),
        (read_unlabelled_text, ".tsv", TextFormatError),
        (read_unlabelled_text, ".txt", TextFormatError),
    ],
)
@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_non_utf8_names_file_and_line(tmp_path: Path, read, suffix: str, error: type, newline: bytes) -> None:
    """A byte that is not UTF-8 is a format error at its line, not a bare ``UnicodeDecodeError``."""
    if read is read_three_line:
        lines = [b"2", b"1,2", b"0,1", b"1", b"3\xff", b"1"]
    elif read is read_long_table:
        lines = [b"order_id,user_id,skill_id,correct", b"1,u1,1,1", b"2,u1,2,0", b"3,u\xe9,2,1"]
    else:
        lines = [b"sentence\tlabel", b"good\t1", b"fine\t0", b"caf\xe9\t1"]
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + newline.join(lines) + newline)
    bad_line = next(k for k, raw in enumerate(lines, start=1) if not raw.isascii())
    with pytest.raises(error, match="Expected UTF-8 text") as info:
        read(path)
    assert info.value.line == bad_line
    assert str(info.value).startswith(f"{path}:{bad_line}: ")
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


def test_non_utf8_far_into_a_large_file(tmp_path: Path) -> None:
    """The line is exact even when the decoder fails in a later buffered chunk."""
    path = tmp_path / "big.csv"
    rows = [b"order_id,user_id,skill_id,correct"] + [b"%d,u%d,%d,1" % (k, k % 7, k % 50 + 1) for k in range(20_000)]
    rows[12_345] = rows[12_345] + b"\x80"
    path.write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(KTFormatError) as info:
        read_long_table(path)
    assert info.value.line == 12_346 and "b'\\x80'" in str(info.value)


def test_huge_numbers_are_format_errors(tmp_path: Path) -> None:
    """Numbers past Python's 4,300-digit conversion limit or int64 are format errors, not bare ``ValueError``s."""
    huge = "7" * 5000
    three = tmp_path / "a.csv"
    three.write_text(f"1\n{huge}\n1\n")
    with pytest.raises(KTFormatError, match=r"a\.csv:2: .*fits in int64"):
        read_three_line(three)
    three.write_text(f"{huge}\n1\n1\n")
    with pytest.raises(KTFormatError, match=r"a\.csv:1: .*count of attempts that fits in int64"):
        read_three_line(three)
    three.write_text("2\n1,\x1c2\n0,1\n")  # \s matches U+001C, int() does not accept it: stripped first
    assert read_three_line(three)[0].exercises.tolist() == [1, 2]
    long = tmp_path / "b.csv"
    long.write_text(f"order_id,user_id,skill_id,correct\n{huge},u,1,1\n")
    with pytest.raises(KTFormatError, match=r"b\.csv:2: .*finite number"):
        read_long_table(long)
    sst = tmp_path / "c.tsv"
    sst.write_text(f"sentence\tlabel\nok\t{huge}\n")
    with pytest.raises(TextFormatError, match=r"c\.tsv:2: .*label that fits in int64"):
        read_labelled_text(sst)
    sst.write_text(f"sentence\tlabel\nok\t-{huge}\n")
    with pytest.raises(TextFormatError, match=r"c\.tsv:2: .*integer label >= 0"):
        read_labelled_text(sst)
    sst.write_text("sentence\tlabel\nok\t0009223372036854775807\n")
    assert read_labelled_text(sst) == (["ok"], [2**63 - 1])


def test_unlabelled_csv_header_error_is_a_format_error(tmp_path: Path) -> None:
    """A CSV error in the header of a transfer set (here a field over the csv module's limit) names the file."""
    path = tmp_path / "t.csv"
    path.write_text('"' + "a" * 200_000 + '"\n')
    with pytest.raises(TextFormatError, match=r"t\.csv:1: Expected a header row but got a CSV error"):
        read_unlabelled_text(path)
