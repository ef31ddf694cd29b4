"""Pictures of what a SAKT model attends to and of how calibrated a KT model is (needs matplotlib:
``pip install lit-kdkt[plot]``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lit_kt.calibration import calibration_bins, expected_calibration_error
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


def reliability_diagram(
    probs: Any,
    labels: Any,
    n_bins: int = 15,
    ax: Any = None,
    calibrated_probs: Any = None,
    title: str | None = None,
):
    """Reliability diagram: the fraction of correct answers per probability bin against the diagonal.

    The probabilities of a correct answer are put into ``n_bins`` equal-width bins (as for the ECE, see
    :mod:`lit_kt.calibration`); bars show each bin's accuracy and a line its mean probability against accuracy (on the
    diagonal when calibrated). A histogram of the bin counts sits below (or, when ``ax`` is given, on a twin axis
    of it). The title gives the ECE; with ``calibrated_probs`` (e.g. after temperature scaling), its line, counts
    and ECE are overlaid.

    Args:
        probs: Predicted probabilities of a correct answer (array-like or tensor, flattened).
        labels: The 0/1 responses, as many.
        n_bins: Number of equal-width bins.
        ax: A matplotlib ``Axes`` to draw on; ``None`` makes a new figure with the counts histogram below.
        calibrated_probs: Optional probabilities of the same positions after calibration, overlaid.
        title: Title; a default gives the ECE (before and after calibration when ``calibrated_probs`` is given).

    Returns:
        The matplotlib ``Figure`` (made without pyplot when ``ax`` is ``None``: save it with ``fig.savefig``).

    Raises:
        ValueError: If a probability is outside ``[0, 1]``, a label is not 0/1, the sizes differ or ``n_bins < 1``.
    """
    from matplotlib.figure import Figure  # no pyplot: the figure belongs to no backend or global state

    series = [("uncalibrated" if calibrated_probs is not None else "model", probs, "tab:blue")]
    if calibrated_probs is not None:
        series.append(("calibrated", calibrated_probs, "tab:orange"))
    below = ax is None
    if below:
        fig = Figure(figsize=(5.5, 6.5))
        ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, ax_count = ax.figure, ax.twinx()
    width = 1.0 / n_bins
    centers = (torch.arange(n_bins, dtype=torch.float64) + 0.5) * width
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    eces = []
    for i, (name, p, color) in enumerate(series):
        conf, acc, count = calibration_bins(p, labels, n_bins)
        ece = expected_calibration_error(p, labels, n_bins)
        eces.append(f"{name} {ece:.4f}" if len(series) > 1 else f"{ece:.4f}")
        seen = count > 0
        if i == 0:
            ax.bar(centers[seen], acc[seen], width=width, color=color, alpha=0.3, edgecolor=color)
        ax.plot(conf[seen], acc[seen], marker="o", color=color, label=f"{name} (ECE {ece:.4f})")
        ax_count.bar(centers, count, width=width * (0.9 if i == 0 else 0.5), color=color, alpha=0.6, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction answered correctly")
    ax.legend(loc="upper left", fontsize=8)
    ax_count.set_ylabel("positions per bin")
    if below:
        ax_count.set_xlabel("predicted probability of a correct answer")
    else:
        ax.set_xlabel("predicted probability of a correct answer")
    ax.set_title(title or f"Reliability, {n_bins} equal-width bins\nECE " + ", ".join(eces), fontsize=10)
    fig.tight_layout()
    return fig


def mastery_heatmap(
    probs: Any,
    exercises: Sequence[int],
    responses: Sequence[int],
    concepts: Sequence[int] | None = None,
    ax: Any = None,
    concept_names: Sequence[str] | dict[int, str] | None = None,
    title: str | None = None,
):
    """Heatmap of one student's mastery over time: concepts (rows) × interactions (columns).

    The colour of cell ``(c, t)`` is the predicted probability of answering concept ``c`` correctly right after
    interaction ``t`` (see :func:`lit_kt.mastery`). The concept practised at step ``t`` is marked on its row: a white
    circle when the student answered it correctly, a black cross when wrongly (steps on concepts outside ``concepts``
    are not marked).

    Args:
        probs: (L, C) probabilities (array-like or tensor), as returned by :func:`lit_kt.mastery`.
        exercises: The student's L exercise (concept) ids, oldest first.
        responses: Their 0/1 responses.
        concepts: The C concept ids of the columns of ``probs``; ``None`` is ``1..C``.
        ax: A matplotlib ``Axes`` to draw on; ``None`` makes a new figure.
        concept_names: Row labels: a sequence of C names, or a ``{concept id: name}`` mapping (ids missing from it
            keep their number); ``None`` labels rows by id.
        title: Title; a default says what is shown.

    Returns:
        The matplotlib ``Figure`` (made without pyplot when ``ax`` is ``None``: save it with ``fig.savefig``).

    Raises:
        ValueError: If ``probs`` is not 2-D or holds values outside ``[0, 1]``, or the lengths of ``exercises``,
            ``responses``, ``concepts`` or ``concept_names`` do not match it.
    """
    from matplotlib.figure import Figure  # no pyplot: the figure belongs to no backend or global state

    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.ndim != 2:
        raise ValueError(f"Expected `probs` to be a 2-D (L, C) array but got shape {tuple(p.shape)}.")
    L, C = p.shape  # (L, C)
    if L and not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError("Expected `probs` to hold probabilities in [0, 1].")
    ex, resp = [int(e) for e in exercises], [int(r) for r in responses]
    if len(ex) != L or len(resp) != L:
        raise ValueError(
            f"Expected `exercises` and `responses` to have L = {L} entries (the rows of `probs`) but got"
            f" {len(ex)} and {len(resp)}."
        )
    ids = list(range(1, C + 1)) if concepts is None else [int(c) for c in concepts]
    if len(ids) != C:
        raise ValueError(f"Expected `concepts` to have C = {C} ids (the columns of `probs`) but got {len(ids)}.")
    if concept_names is None:
        labels = [str(c) for c in ids]
    elif isinstance(concept_names, dict):
        labels = [str(concept_names.get(c, c)) for c in ids]
    else:
        labels = [str(n) for n in concept_names]
        if len(labels) != C:
            raise ValueError(f"Expected `concept_names` to have C = {C} names but got {len(labels)}.")
    if ax is None:
        fig = Figure(figsize=(max(5.0, 0.18 * L + 3), max(3.0, 0.28 * C + 1.5)))
        ax = fig.subplots()
    else:
        fig = ax.figure
    im = ax.imshow(p.T.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")  # (C, L)
    row = {c: i for i, c in enumerate(ids)}
    marks = (
        (1, {"marker": "o", "facecolors": "none", "edgecolors": "white"}, "answered correctly"),
        (0, {"marker": "x", "color": "black"}, "answered wrongly"),
    )
    for correct, style, label in marks:
        steps = [t for t in range(L) if resp[t] == correct and ex[t] in row]
        if steps:
            ax.scatter(steps, [row[ex[t]] for t in steps], s=30, linewidths=1.2, label=label, **style)
    ax.set_yticks(range(C), labels, fontsize=7)
    step = max(1, L // 25)
    ax.set_xticks(range(0, L, step), [str(t) for t in range(0, L, step)], fontsize=7)
    ax.set_xlim(-0.5, L - 0.5)
    ax.set_ylim(C - 0.5, -0.5)
    ax.set_xlabel("interaction t (mastery given interactions 0..t)")
    ax.set_ylabel("concept")
    if ax.get_legend_handles_labels()[0]:
        legend = ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), ncol=2, fontsize=7, facecolor="lightgrey")
        legend.get_frame().set_alpha(1.0)
    ax.set_title(title or "Predicted probability of a correct answer per concept over time", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="P(correct)")
    fig.tight_layout()
    return fig
