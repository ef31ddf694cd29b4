"""A user's own Lightning project, as the DistillationCallback tests see it (importable as ``tests.kd_user_project``).

Its LightningModule has its own ``training_step`` and loss, its own metric, its own SGD optimizer with an epoch-wise
``StepLR``, and batches shaped ``{"ids", "attn", "y"}``. The teacher is a tiny random ``transformers`` BERT whose
``forward`` names its inputs ``input_ids``/``attention_mask``. Nothing here knows about distillation.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from lit_kd import default_adaptor

VOCAB, LEN, LABELS = 30, 6, 3
TEACHER_INPUTS = {"input_ids": "ids", "attention_mask": "attn"}
user_adaptor = partial(default_adaptor, labels_key="y", mask_key="attn")


class TinyEncoder(nn.Module):
    """Embeddings, one position-wise layer, masked mean pooling and a linear head: (B, L) ids -> (B, C) logits."""

    def __init__(self, width: int = 8, labels: int = LABELS, seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, width)
        self.encoder = nn.Linear(width, width)
        self.head = nn.Linear(width, labels)

    def forward(self, ids: Tensor, attn: Tensor) -> Tensor:
        h = torch.tanh(self.encoder(self.embed(ids)))  # (B, L, D)
        m = attn.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1))  # (B, C)


class MyModule(L.LightningModule):
    """The user's module: cross-entropy on ``y``, an accuracy metric, SGD and a per-epoch StepLR."""

    def __init__(self, width: int = 8, lr: float = 1.0, momentum: float = 0.0, gamma: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyEncoder(width)
        self.train_acc = MulticlassAccuracy(num_classes=LABELS)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(batch["ids"], batch["attn"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.net(batch["ids"], batch["attn"])
        loss = F.cross_entropy(logits, batch["y"])
        self.train_acc(logits, batch["y"])
        self.log("user/acc", self.train_acc, on_step=True, on_epoch=False)
        self.log("user/loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.hparams.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def tiny_teacher(seed: int = 0, width: int = 16, layers: int = 2) -> nn.Module:
    """A random ``BertForSequenceClassification`` over the same ids (:data:`LABELS` classes)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=16,
        num_labels=LABELS,
    )
    return BertForSequenceClassification(config)


class Samples(Dataset):
    """``n`` samples ``{"ids": (L,), "attn": (L,), "y": ()}``; every fourth one padded after 3 tokens."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LEN), generator=g)
        self.attn = torch.ones(n, LEN, dtype=torch.long)
        self.attn[::4, 3:] = 0
        self.ids[::4, 3:] = 0
        self.y = torch.randint(0, LABELS, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"ids": self.ids[i], "attn": self.attn[i], "y": self.y[i]}


class UserData(L.LightningDataModule):
    """Training batches of :class:`Samples`, in file order."""

    def __init__(self, n: int = 16, batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Samples(self.n, self.seed), batch_size=self.batch_size, shuffle=False)


def my_kd(logits_s: Tensor, logits_t: Tensor, temperature: Tensor, mask: Tensor | None = None) -> Tensor:
    """A user KD loss: L1 distance between the tempered distributions, mean over samples."""
    diff = (F.softmax(logits_s / temperature, -1) - F.softmax(logits_t / temperature, -1)).abs().sum(-1)  # (N,)
    return diff.mean() if mask is None else diff[mask].mean()


def my_match(feature_s: Tensor, feature_t: Tensor, mask: Tensor | None) -> Tensor:
    """A user match loss: squared error per token, mean over real tokens."""
    per_token = (feature_s - feature_t).pow(2).mean(-1)  # (B, L)
    return per_token.mean() if mask is None else per_token[mask].mean()


def two_args(logits_s: Tensor, logits_t: Tensor) -> Tensor:
    """A loss with the wrong signature (no temperature)."""
    return (logits_s - logits_t).abs().mean()
