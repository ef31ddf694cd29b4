"""Pictures of what a SAKT model attends to (needs matplotlib: ``pip install lit-kdkt[plot]``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lit_kt.models.sakt import SAKT


def attention_matrix(
    model: SAKT, exercises: Sequence[int], responses: Sequence[int], layer: int = 0, head: int | None = None
) -> torch.Tensor:
    """SAKT's attention over one student's history, (L, L): row ``t`` is the prediction of position ``t``.

    Column 0 is the start token and column ``j >= 1`` is interaction ``j - 1``. ``head=None`` averages the heads.

    Raises:
        ValueError: If ``layer`` or ``head`` is out of range, or the sequence is empty or longer than ``max_len``.
    """
    if not len(exercises):
        raise ValueError("Expected a non-empty history in `exercises` but got none.")
    if not 0 <= layer < len(model.blocks):
        raise ValueError(f"Expected `layer` to be < {len(model.blocks)} (the model's blocks) but got {layer}.")
    num_heads = model.blocks[layer].num_heads
    if head is not None and not 0 <= head < num_heads:
        raise ValueError(f"Expected `head` to be None or < {num_heads} (the model's heads) but got {head}.")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ex = torch.as_tensor(list(exercises), dtype=torch.long).unsqueeze(0)
            resp = torch.as_tensor(list(responses), dtype=torch.long).unsqueeze(0)
            _, weights = model(ex, resp, return_attention=True)
    finally:
        model.train(was_training)
    w = weights[layer][0]  # (H, L, L)
    return w.mean(0) if head is None else w[head]


def plot_attention(
    model: SAKT,
    exercises: Sequence[int],
    responses: Sequence[int],
    path: str | Path,
    layer: int = 0,
    head: int | None = None,
    title: str | None = None,
) -> Path:
    """Draw SAKT's attention over one student's history as a heatmap PNG.

    Rows are the predicted positions, labelled with the exercise id and whether the student then answered it
    correctly (✓/✗); columns are what each prediction may look at: the start token, then the past interactions
    (exercise id and correctness). The upper triangle is empty by construction (causality).

    Args:
        model: A trained SAKT model.
        exercises: One student's exercise ids (at most ``model.max_len``).
        responses: Their 0/1 responses.
        path: Where to write the PNG.
        layer: Which attention block.
        head: One head, or ``None`` for the mean over heads.
        title: Figure title; a default names the layer and head.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = attention_matrix(model, exercises, responses, layer, head).numpy()
    mark = {0: "✗", 1: "✓"}
    rows = [f"{e} {mark[int(r)]}" for e, r in zip(exercises, responses)]
    cols = ["start"] + rows[:-1]
    n = len(rows)
    size = max(4.0, 0.28 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(w, cmap="viridis", vmin=0.0)
    ax.set_xticks(range(n), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(n), rows, fontsize=7)
    ax.set_xlabel("attended interaction (exercise id, correctness)")
    ax.set_ylabel("predicted exercise (id, actual answer)")
    which = "mean over heads" if head is None else f"head {head}"
    ax.set_title(title or f"SAKT attention, block {layer}, {which}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
