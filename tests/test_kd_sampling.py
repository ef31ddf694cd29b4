"""Training samplers: length-grouped batches, and the stream of transfer rows that uses every row once before any
twice while the labelled order stays that of the labelled sampler."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import RandomSampler

from lit_kd.data import UNLABELLED, TextClassificationDataModule
from lit_kd.sampling import LengthGroupedSampler, TransferMixSampler
from tests.ddp_helpers import KD_TRAIN_SIZE, write_text_data


def mean_batch_max(order: list[int], lengths: list[int], batch_size: int) -> float:
    maxima = [max(lengths[i] for i in order[k : k + batch_size]) for k in range(0, len(order), batch_size)]
    return sum(maxima) / len(maxima)


def test_length_grouped_order_is_a_permutation_with_less_padding():
    rng = random.Random(0)
    lengths = [min(64, int(rng.expovariate(1 / 13)) + 3) for _ in range(4000)]  # skewed, like SST-2's phrases
    sampler = LengthGroupedSampler(lengths, 32, torch.Generator().manual_seed(0))
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(4000)) and first != second  # a new order each epoch
    grouped = mean_batch_max(first, lengths, 32)
    shuffled = torch.randperm(4000, generator=torch.Generator().manual_seed(0)).tolist()
    random_order = mean_batch_max(shuffled, lengths, 32)
    mean = sum(lengths) / len(lengths)
    assert grouped < 0.6 * random_order and grouped < 1.3 * mean
    with pytest.raises(ValueError, match="at least one sample length"):
        LengthGroupedSampler([], 32)


@pytest.mark.parametrize("lengths", [None, "grouped"])
def test_transfer_stream_uses_every_row_once_before_any_twice(lengths):
    num_labelled, num_transfer, per_sample = 10, 37, 2
    transfer_lengths = [1 + (7 * j) % 23 for j in range(num_transfer)] if lengths else None
    labelled = RandomSampler(range(num_labelled), generator=torch.Generator().manual_seed(1))
    plain = RandomSampler(range(num_labelled), generator=torch.Generator().manual_seed(1))
    sampler = TransferMixSampler(labelled, num_transfer, per_sample, seed=5, transfer_lengths=transfer_lengths)
    stream = []
    for _ in range(6):  # epochs: 6 * 10 * 2 = 120 rows, over 3 passes and a part of the fourth
        keys = list(sampler)
        assert [i for i, _ in keys] == list(plain)  # the labelled order of the labelled sampler, epoch by epoch
        assert all(len(rows) == per_sample for _, rows in keys)
        stream += [j for _, rows in keys for j in rows]
    for start in range(0, 111, num_transfer):  # each complete pass is a permutation of the transfer set
        assert sorted(stream[start : start + num_transfer]) == list(range(num_transfer))
    assert stream[:num_transfer] != stream[num_transfer : 2 * num_transfer]  # passes are shuffled differently
    again = TransferMixSampler(
        RandomSampler(range(num_labelled), generator=torch.Generator().manual_seed(1)),
        num_transfer,
        per_sample,
        seed=5,
        transfer_lengths=transfer_lengths,
    )
    assert [j for _ in range(6) for _, rows in again for j in rows] == stream  # reproducible from the seeds
    with pytest.raises(ValueError, match="one length per transfer row"):
        TransferMixSampler(labelled, 3, transfer_lengths=[1, 2])


def test_module_batches_same_labelled_rows_with_and_without_transfer_and_grouped(tmp_path):
    folder = write_text_data(tmp_path / "data")
    dm = TextClassificationDataModule(
        str(folder),
        tokenizer=str(folder / "tokenizer"),
        batch_size=4,
        train_limit=KD_TRAIN_SIZE // 2,
        transfer_unused_train=True,
        transfer_augment=3,
        group_by_length=True,
    )
    dm.setup("fit")
    transfer = dm.transfer_dataset()
    num_transfer = len(transfer)
    loader_kd = torch.utils.data.DataLoader(
        dm.train_dataset(), batch_size=4, sampler=dm.train_sampler(torch.Generator().manual_seed(3)),
        collate_fn=dm.train_dataloader().collate_fn,
    )  # fmt: skip
    loader_alone = torch.utils.data.DataLoader(
        dm.dataset("train"), batch_size=4, sampler=dm.train_sampler(torch.Generator().manual_seed(3), transfer=False),
        collate_fn=dm.train_dataloader().collate_fn,
    )  # fmt: skip
    used = []
    for _ in range(-(-num_transfer // (KD_TRAIN_SIZE // 2)) + 1):  # enough epochs to go through the transfer set
        for kd, alone in zip(loader_kd, loader_alone, strict=True):
            labelled = kd["labels"] != UNLABELLED
            assert kd["index"][labelled].tolist() == alone["index"].tolist()
            used += (kd["index"][~labelled] - KD_TRAIN_SIZE // 2).tolist()
    assert set(used[:num_transfer]) == set(range(num_transfer))  # every transfer row before any repeat
