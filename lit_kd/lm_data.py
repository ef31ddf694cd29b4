"""Language-modelling data: the sentences of a folder in the SST-2 layout, tokenised once, batched for a causal LM.

A batch is a dict of tensors, right-padded to the longest sequence of the batch:

- ``input_ids`` (B, L) int64 token ids, padded with the tokenizer's pad id;
- ``attention_mask`` (B, L) int64, 1 at real tokens and 0 at padding;
- ``labels`` (B, L) int64, ``input_ids`` with -100 at the padding (the causal shift is the model's business:
  :class:`~lit_kd.lm.CausalLMModule`, or ``DistillationModule(task_type="causal_lm")``);
- ``index`` (B,) int64, the sample's index in its split.

No ``token_type_ids``: a GPT-2 would read them as extra token embeddings.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_kd._files import distributed_eval_sampler
from lit_kd.adaptors import IGNORE_INDEX
from lit_kd.data import read_unlabelled_text, resolve_pin_memory
from lit_kd.students import resolve_name_or_path

__all__ = [
    "IGNORE_INDEX",
    "LanguageModelingDataModule",
    "LengthGroupedBatchSampler",
    "TokenizedSentences",
    "collate_lm",
]

Split = Literal["train", "val", "test"]


class TokenizedSentences(Dataset):
    """Token ids of one split, each item ``{"input_ids": list[int], "index": int}``.

    Args:
        input_ids: One list of token ids per sentence (non-empty).
    """

    def __init__(self, input_ids: Sequence[Sequence[int]]) -> None:
        self.input_ids = list(input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[index], "index": index}


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Random batches of sentences of similar lengths, so that little of a batch is padding.

    Each epoch the indices are shuffled, cut into pools of ``pool`` batches, each pool sorted by length and cut into
    batches, and the batches shuffled (Hugging Face's ``group_by_length``). Every index is used once per epoch; the
    last batch may be smaller.

    Args:
        lengths: Length of each sample.
        batch_size: Samples per batch.
        pool: Batches per sorted pool: larger pools pad less and mix less.
        generator: The random source; ``None`` draws a seed from torch's global generator each epoch (seeded by
            ``seed_everything``).
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, pool: int = 50, generator: torch.Generator | None = None
    ) -> None:
        if batch_size < 1 or pool < 1:
            raise ValueError(f"Expected `batch_size` and `pool` to be >= 1 but got {batch_size} and {pool}.")
        self.lengths, self.batch_size, self.pool, self.generator = list(lengths), batch_size, pool, generator

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        g = self.generator
        if g is None:
            g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for i in torch.randperm(len(batches), generator=g).tolist():
            yield batches[i]


def collate_lm(items: Sequence[dict[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pads :class:`TokenizedSentences` items into a batch (see the module docstring for its layout).

    Args:
        items: Dataset items.
        pad_token_id: Id written at padded positions of ``input_ids``.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (each (B, L) int64, L the longest item) and ``index`` (B,).
    """
    longest = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(items), longest, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


class LanguageModelingDataModule(L.LightningDataModule):
    """Sentences for (distilling) a causal language model: ``train.tsv`` to train, ``dev.tsv`` to validate and test.

    ``data_dir`` is in the SST-2 layout (a header naming ``text_col``; other columns, labels included, are ignored;
    see :func:`~lit_kd.data.read_unlabelled_text`). With ``carve_dev = N`` the last N rows of ``train.tsv`` are held
    out of training and serve as the validation and test split instead of ``dev.tsv`` (a second split; ``dev.tsv``
    is then not read). Sentences are tokenised once per split on first use (with the tokenizer's special tokens,
    e.g. BERT's ``[CLS] ... [SEP]``, which then act as begin and end of sentence), truncated to ``max_length`` and
    padded per batch by :func:`collate_lm`.

    Args:
        data_dir: Folder with ``train.tsv`` and (unless ``carve_dev``) ``dev.tsv``.
        tokenizer: Name or local path of a fast tokenizer for ``AutoTokenizer.from_pretrained``;
            ``"all-MiniLM-L6-v2"`` is the installed one (:func:`~lit_kd.students.minilm_path`).
        max_length: Longest tokenised sequence, special tokens included (>= 2: one prediction at least).
        batch_size: Training sentences per batch.
        eval_batch_size: Validation/test sentences per batch; ``None`` for ``batch_size``.
        num_workers: DataLoader worker processes; 0 collates batches in the training process, between steps. On a
            GPU a few workers (2 to 4) collate the next batches while the GPU runs the current step; workers persist
            across epochs.
        train_limit: Train on the first ``train_limit`` rows (after ``carve_dev`` is held out) only; ``None`` for all.
        carve_dev: Hold out the last ``carve_dev`` rows of ``train.tsv`` as the validation/test split; 0 for
            ``dev.tsv``.
        text_col: Column holding the sentence.
        add_special_tokens: Let the tokenizer add its special tokens (begin/end of sentence).
        group_by_length: Draw training batches of similar lengths (:class:`LengthGroupedBatchSampler`): far less
            padding, so faster steps, at the cost of batches less mixed in length; False for plain shuffling.
            Single-process only: under DDP Lightning cannot shard a custom batch sampler, so it is refused there
            rather than letting every process train on the same batches.
        pin_memory: Pin the loaders' batches in page-locked host memory, so that their copy to the GPU runs
            asynchronously (:func:`~lit_kd.data.resolve_pin_memory`); ``None`` pins when the attached trainer's
            accelerator is a CUDA GPU and not otherwise.

    Raises:
        TypeError: If ``data_dir`` is not a path.
        ValueError: If a size is out of range.

    Example:
        >>> dm = LanguageModelingDataModule("../shared/data/nlp/sst2", max_length=64)  # doctest: +SKIP
        >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> sorted(batch), batch["labels"].shape  # doctest: +SKIP
        (['attention_mask', 'index', 'input_ids', 'labels'], torch.Size([32, 23]))
    """

    def __init__(
        self,
        data_dir: str,
        tokenizer: str = "all-MiniLM-L6-v2",
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_limit: int | None = None,
        carve_dev: int = 0,
        text_col: str = "sentence",
        add_special_tokens: bool = True,
        group_by_length: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(f"Expected `data_dir` to be a folder path but got {data_dir!r}.")
        if not isinstance(tokenizer, str) or not tokenizer:
            raise ValueError(f"Expected `tokenizer` to be a tokenizer name or path but got {tokenizer!r}.")
        for name, value, least in (
            ("max_length", max_length, 2),
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("train_limit", train_limit, 1),
            ("carve_dev", carve_dev, 0),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"Expected `{name}` to be an integer >= {least} but got {value!r}.")
        self.save_hyperparameters()
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._texts: dict[str, list[str]] = {}
        self._datasets: dict[str, TokenizedSentences] = {}

    # ------------------------------------------------------------------ loading
    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The fast tokenizer (loaded once, from local files only).

        Raises:
            ValueError: If it is not a fast tokenizer or defines no pad token.
        """
        if self._tokenizer is None:
            name = self.hparams.tokenizer
            tok = AutoTokenizer.from_pretrained(resolve_name_or_path(name), trust_remote_code=False)
            if not tok.is_fast:
                raise ValueError(
                    f"Expected `tokenizer` to name a fast tokenizer but got {type(tok).__name__} for {name!r}."
                )
            if tok.pad_token_id is None:
                raise ValueError(f"Expected `tokenizer` to define a pad token but {name!r} has none.")
            self._tokenizer = tok
        return self._tokenizer

    def _file(self, name: str) -> Path:
        path = Path(self.hparams.data_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"Expected a data file at {path} (`data_dir`) but it does not exist.")
        return path

    def texts(self, split: Split) -> list[str]:
        """The sentences of one split (read on first use): ``train.tsv`` less the carved rows (and after
        ``train_limit``), or ``dev.tsv`` / the carved rows for ``"val"`` and ``"test"``.

        Raises:
            FileNotFoundError: If a file is missing.
            TextFormatError: If a file is malformed (with the file and the line).
            ValueError: If ``carve_dev`` leaves no training row.
        """
        key = "train" if split == "train" else "eval"
        if key not in self._texts:
            h = self.hparams
            if key == "eval" and not h.carve_dev:
                self._texts[key] = read_unlabelled_text(self._file("dev.tsv"), h.text_col)
            else:
                path = self._file("train.tsv")
                rows = read_unlabelled_text(path, h.text_col)
                if h.carve_dev and h.carve_dev >= len(rows):
                    raise ValueError(
                        f"Expected `carve_dev` to be < the {len(rows)} rows of {path} (some left to train on) but got"
                        f" {h.carve_dev}."
                    )
                cut = len(rows) - h.carve_dev
                self._texts["train"] = rows[:cut][: h.train_limit]
                if h.carve_dev:
                    self._texts["eval"] = rows[cut:]
        return self._texts[key]

    def dataset(self, split: Split) -> TokenizedSentences:
        """The tokenised sentences of one split (built on first use; validation and test share one)."""
        key = "train" if split == "train" else "eval"
        if key not in self._datasets:
            enc = self.load_tokenizer()(
                self.texts(split),
                truncation=True,
                max_length=self.hparams.max_length,
                add_special_tokens=self.hparams.add_special_tokens,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            self._datasets[key] = TokenizedSentences(enc["input_ids"])
        return self._datasets[key]

    # ------------------------------------------------------------------ derived sizes
    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer, added tokens included."""
        return len(self.load_tokenizer())

    @property
    def pad_token_id(self) -> int:
        """Pad id of the tokenizer."""
        return self.load_tokenizer().pad_token_id

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        by_stage = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in by_stage.get(stage, ("train", "val")):
            self.dataset(split)

    def _loader(self, split: Split) -> DataLoader:
        h = self.hparams
        dataset = self.dataset(split)
        common = {
            "num_workers": h.num_workers,
            "collate_fn": functools.partial(collate_lm, pad_token_id=self.pad_token_id),
            "pin_memory": resolve_pin_memory(h.pin_memory, self.trainer),
            "persistent_workers": h.num_workers > 0,
        }
        if split == "train" and h.group_by_length:
            world_size = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
            if world_size > 1:
                raise ValueError(
                    f"Expected `group_by_length` to be False with several processes (world size {world_size}): its "
                    "batch sampler is not sharded across processes, so each would train on the same batches."
                )
            lengths = [len(ids) for ids in dataset.input_ids]
            return DataLoader(dataset, batch_sampler=LengthGroupedBatchSampler(lengths, h.batch_size), **common)
        return DataLoader(
            dataset,
            batch_size=h.batch_size if split == "train" or h.eval_batch_size is None else h.eval_batch_size,
            shuffle=split == "train",
            sampler=None if split == "train" else distributed_eval_sampler(dataset, self.trainer),
            **common,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
