"""Training-order samplers for text: length-grouped batches, and labelled samples paired with a stream of transfer rows.

Both keep what a comparison of "with distillation" and "alone" needs: the labelled samples, their order and so their
batches depend only on the labelled sampler (and its generator), never on the transfer set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

__all__ = ["LengthGroupedSampler", "TransferMixSampler"]


class LengthGroupedSampler(Sampler[int]):
    """A random order in which each run of ``batch_size`` indices holds samples of similar lengths.

    Each epoch: a fresh random permutation, cut into mega-batches of 50 batches, each sorted by length
    (``transformers``' ``get_length_grouped_indices``, as ``Trainer(group_by_length=True)`` does). A batch padded to
    its longest sample then carries little padding: on SST-2's training phrases (13.3 tokens on average) random
    batches of 32 pad to 40 tokens on average, grouped ones to about the mean.

    Args:
        lengths: Length of every sample (tokens).
        batch_size: Samples per batch.
        generator: Random source of the permutations (seed it for a reproducible order); ``None`` for torch's global
            one.

    Raises:
        ValueError: If ``lengths`` is empty or ``batch_size < 1``.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator | None = None) -> None:
        if not lengths:
            raise ValueError("Expected `lengths` to hold at least one sample length but got none.")
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be >= 1 but got {batch_size}.")
        self.lengths, self.batch_size, self.generator = list(lengths), batch_size, generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=self.generator))


class TransferMixSampler(Sampler[tuple[int, tuple[int, ...]]]):
    """Labelled indices, each paired with the next ``per_sample`` rows of a stream over the transfer set.

    Yields ``(i, (j_1, ..., j_k))`` keys for :class:`~lit_kd.data.TransferMixDataset`: ``i`` in the order of
    ``labelled`` (so the labelled batches are exactly those of a run without the transfer set), the ``j`` from a
    stream that walks through seeded permutations of the transfer set one after another (pass ``p`` shuffled with
    ``seed + p``) and carries on across epochs. Every transfer row is therefore used once before any is used twice,
    however large the transfer set is against the labelled set (a transfer set 30 times the labelled set is read
    over 30 epochs of labelled data at one row per sample, not reduced to a fixed thirtieth). With
    ``transfer_lengths`` each pass is length-grouped in runs of ``batch_size * per_sample`` rows (see
    :class:`LengthGroupedSampler`), so that the transfer rows of one batch have similar lengths.

    The stream's position lives in the sampler: a run resumed from a checkpoint restarts it at the first pass.

    Args:
        labelled: The labelled order (e.g. a ``RandomSampler`` or :class:`LengthGroupedSampler`), re-iterated each
            epoch.
        num_transfer: Rows in the transfer set.
        per_sample: Transfer rows per labelled sample, >= 1.
        seed: Seed of the transfer stream.
        transfer_lengths: Length of every transfer row, to group them by length; ``None`` for plain permutations.
        batch_size: Labelled samples per batch (used only for the length grouping).

    Raises:
        ValueError: If the transfer set is empty, ``per_sample < 1`` or ``transfer_lengths`` does not hold one length
            per transfer row.
    """

    def __init__(
        self,
        labelled: Sampler[int],
        num_transfer: int,
        per_sample: int = 1,
        seed: int = 0,
        transfer_lengths: Sequence[int] | None = None,
        batch_size: int = 1,
    ) -> None:
        if num_transfer < 1:
            raise ValueError(f"Expected a non-empty transfer set but got {num_transfer} rows.")
        if per_sample < 1:
            raise ValueError(f"Expected `per_sample` to be >= 1 but got {per_sample}.")
        if transfer_lengths is not None and len(transfer_lengths) != num_transfer:
            raise ValueError(
                f"Expected one length per transfer row ({num_transfer}) but got {len(transfer_lengths)} lengths."
            )
        self.labelled, self.num_transfer, self.per_sample, self.seed = labelled, num_transfer, per_sample, seed
        self.transfer_lengths, self.batch_size = transfer_lengths, batch_size
        self.drawn = 0  # transfer rows handed out so far, over all epochs
        self._pass: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        return len(self.labelled)  # type: ignore[arg-type]

    def _row(self, position: int) -> int:
        number, offset = divmod(position, self.num_transfer)
        if self._pass[0] != number:
            generator = torch.Generator().manual_seed(self.seed + number)
            if self.transfer_lengths is None:
                order = torch.randperm(self.num_transfer, generator=generator).tolist()
            else:
                group = self.batch_size * self.per_sample
                order = get_length_grouped_indices(self.transfer_lengths, group, generator=generator)
            self._pass = (number, order)
        return self._pass[1][offset]

    def __iter__(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        for i in self.labelled:
            rows = tuple(self._row(self.drawn + m) for m in range(self.per_sample))
            self.drawn += self.per_sample
            yield int(i), rows
