"""Training and predict throughput of ``lit_kt``'s SAKT, DKT and AKT against pyKT's own classes, in one process.

    python scripts/bench_vs_pykt.py --json /tmp/peers/pykt.json
    python scripts/bench_vs_pykt.py --models akt --threads 1 --json out/pykt_akt.json

Needs ``pip install --no-deps pykt-toolkit`` plus ``pip install pandas scikit-learn`` (``pykt/__init__.py`` imports
its data and evaluation code, which import them); without ``--no-deps`` pip also pulls wandb and friends.

Both sides train on the *same batches* of ASSIST2009 windows (``--data-dir``/``--file``, cut by
:class:`~lit_kt.KTDataset` into non-overlapping windows of ``--max-len`` interactions, windows of fewer than 3
left out as pyKT's preprocessing does (``min_seq_len``), shuffled with ``--seed``,
right-padded to ``--max-len`` by default so that every batch has the shape pyKT's own loader gives). The steps
alternate, ours then pyKT's on the same batch, so that load from other jobs on the machine hits both alike; the first
``--warmup`` steps of each side are left out.

* Ours: ``lit_kt.SAKT`` / ``lit_kt.DKT`` / ``lit_kt.AKT`` ``forward(exercises, responses)`` -> (B, L) logits,
  :func:`~lit_kt.masked_bce_with_logits` over the real positions, ``backward``, ``Adam.step``.
  Given the same padded batch, our models skip the padding themselves on CPU (SAKT: position-wise layers on the
  real positions, attention cut to each row's length; DKT: the LSTM on groups of similar-length rows; AKT:
  position-wise layers on the real positions, attention on groups of similar-length rows, each cut to its longest),
  with the same outputs at the real positions (``tests/test_kt_fast_paths.py``, ``tests/test_akt_fast.py``); that is
  part of what is measured.
* pyKT: ``pykt.models.sakt.SAKT`` / ``pykt.models.dkt.DKT`` / ``pykt.models.akt.AKT`` fed through pyKT's own training
  path, ``pykt.models.train_model.model_forward`` (SAKT ``forward(c, r, cshft)``; DKT ``forward(c, r)`` then the
  ``one_hot(cshft)`` selection; AKT ``forward(cc, cr, cq)`` on the whole sequence, predictions ``[:, 1:]``, plus its
  Rasch penalty, 0 here; BCE in float64 on the selected positions), ``backward``, ``Adam.step``. Its batch is the
  dict pyKT's ``KTDataset`` returns for the same window: 0-based concept ids, the sequence and its shift by one (so it
  scores positions 1..n-1 of each window; ours also scores position 0 from a start token, or for AKT from the
  question alone).

Model settings follow pyKT's shipped ``configs/kt_config.json`` (SAKT ``emb_size`` 256, 8 heads, ``num_en`` 1,
dropout 0.2; DKT ``emb_size`` 200, dropout 0.1; AKT ``d_model`` 256, ``d_ff`` 256, ``n_blocks`` 1, dropout 0.05, and
the class defaults ``num_attn_heads`` 8, ``final_fc_dim`` 512, ``kq_same`` 1; ``seq_len`` 200, Adam lr 1e-3 (pyKT's
AKT entry says 1e-5; the rate does not change a step's cost)) except the batch: 64 instead of 256 so that the run
takes a few minutes on a small CPU (``--batch-size 256`` gives pyKT's). Our models get the same widths, heads,
blocks, dropout and length (``max_len`` = pyKT's ``seq_len``).

AKT's mapping. ASSIST2009 has concept ids only: pyKT's AKT runs with ``n_pid`` 0 (no Rasch embeddings), ours without
``questions``. pyKT's ``n_blocks`` gives ``blocks_1``, ``n_blocks`` blocks encoding the interactions, and
``blocks_2``, ``2 n_blocks`` blocks alternating question self-attention (no feed-forward) and knowledge retrieval
(queries and keys the questions, values the encoded interactions, strictly past). Ours: ``num_encoder_layers`` =
``num_retriever_layers`` = ``n_blocks`` (question encoder, interaction encoder and retriever of ``n_blocks`` blocks
each, the same ``3 n_blocks`` attentions; our question-encoder blocks have a feed-forward, pyKT's do not, so ours does
a little more work). Widths, heads and dropout are pyKT's; our output MLP is ``2 d_model -> d_ff -> d_ff / 2 -> 1``
(256 -> 128 at ``d_ff`` 256), pyKT's ``2 d_model -> final_fc_dim -> 256 -> 1`` (512 -> 256). The attentions differ in
small ways that cost about the same: pyKT takes the square root of the distance and clamps the decay to
[1e-5, 1e5]; ours follows the paper.

Predict throughput: ``eval()`` forward under ``torch.no_grad`` returning probabilities (ours: ``sigmoid`` of the
logits, as ``KTModule.predict_step``; pyKT's models return probabilities), same batches, alternated too.

Options beyond the default like-for-like run (same windows on both sides whatever they are):

* ``--pad ours_longest --batching bucketed``: the two *pipelines* rather than the two models. Our ``collate_kt``
  pads a batch to its longest window, pyKT's loader always to ``seq_len``; with windows of similar length per batch
  (bucketed), our side then skips most of the padding (ASSIST2009 windows hold about 74 of 200 interactions).
* ``--pad longest``: both sides padded to the batch's longest window (same shapes).
* ``--no-flush-denormal``: leave denormal floats on. By default the process runs with
  ``torch.set_flush_denormal(True)`` (both sides), as ``lit_kt.KTModule`` fits on CPU by default
  (``flush_denormal=True``): DKT's LSTM gradients decay over long histories into denormal floats, which the CPU
  processes far more slowly (our DKT backward meets more of them than pyKT's; pyKT's time hardly changes).

Device and precision (both sides alike):

* ``--device cuda`` moves both models and every batch (before the timed steps) to the GPU, and synchronises
  (``torch.cuda.synchronize()``) before each timed step starts and after it ends, so that a step's time is the time
  its kernels take, not the time it takes to queue them. pyKT picks its device once, at import
  (``"cuda" if torch.cuda.is_available()``), for the masks and positions its models build; the script sets those
  module globals to ``--device`` so that ``--device cpu`` also runs on a machine with a GPU. Our models skip the
  padding on CPU only; on CUDA they run on the padded batch (SAKT, AKT) or on packed sequences (DKT), which need
  no copy of the lengths to the host per step. ``--device cuda`` without a GPU is an error naming the argument.
* ``--precision bf16`` runs the forward under ``torch.autocast(device, dtype=torch.bfloat16)``: ours around forward
  + loss; pyKT's around its model's forward, its loss (``binary_cross_entropy`` on probabilities, in float64) after
  it, since CUDA's autocast refuses ``binary_cross_entropy`` (our loss takes logits and autocasts to float32).
  Parameters and optimizer states stay float32 on both sides. ``--precision 32`` (the default) uses no autocast.

The JSON records ``device`` (``torch.cuda.get_device_name()`` on CUDA, else the ``machine`` line), ``device_type``
and ``precision``.

Everything runs once per ``--threads`` entry (``1`` = ``torch.set_num_threads(1)``, ``0`` = torch's default).
Prints and writes (``--json``) per thread setting and model: mean and median seconds per step for each side,
non-padded interactions per second (the batch's real interactions over the mean step time, the same count for both
sides) and ``speedup`` = pyKT seconds per step / ours. The top-level ``<model>_speedup`` and
``<model>_predict_speedup`` (``sakt_speedup``, ``dkt_speedup``, ``akt_speedup``, ...) are those of the first
``--threads`` entry, for the models run (``--models``, default ``sakt,dkt``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _bench import autocast, device_name, dist_version, emit, machine, resolve_device, synchronizer

from lit_kt import AKT, DKT, SAKT, KTDataset, collate_kt, masked_bce_with_logits, read_three_line

INSTALL_HINT = "pip install --no-deps pykt-toolkit && pip install pandas scikit-learn"
MIN_WINDOW = 3  # pyKT's min_seq_len: its preprocessing drops shorter sequences and remainders
MODELS = ("sakt", "dkt", "akt")


# The shared data sets beside the repository (../shared/data), wherever it is checked out.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def pin_pykt_device(device: torch.device) -> None:
    """Points pyKT's import-time ``device`` globals (masks and positions its models build) at ``device``."""
    import pykt.models.akt
    import pykt.models.train_model
    import pykt.models.utils

    pykt.models.utils.device = str(device)  # a string there, a torch.device in the other two
    pykt.models.akt.device = pykt.models.train_model.device = device


def import_pykt():
    """pyKT's SAKT, DKT, AKT and training forward, or a clear message saying what to install."""
    try:
        from pykt.models.akt import AKT as PyKTAKT
        from pykt.models.dkt import DKT as PyKTDKT
        from pykt.models.sakt import SAKT as PyKTSAKT
        from pykt.models.train_model import model_forward
    except ImportError as err:
        raise SystemExit(f"Could not import pyKT ({err}). Install it with: {INSTALL_HINT}") from err
    return PyKTSAKT, PyKTDKT, PyKTAKT, model_forward


def window_order(lengths: np.ndarray, a: argparse.Namespace) -> list[np.ndarray]:
    """Window indices of each batch: random, or length-bucketed (sorted within chunks of 50 batches, then shuffled).

    Windows shorter than ``MIN_WINDOW`` are left out, as pyKT's preprocessing drops them.
    """
    rng = np.random.default_rng(a.seed)
    order = rng.permutation(np.flatnonzero(lengths >= MIN_WINDOW))
    if a.batching == "bucketed":
        chunk = 50 * a.batch_size
        pieces = np.split(order, range(chunk, len(order), chunk))
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in pieces])
    batches = [order[i : i + a.batch_size] for i in range(0, len(order) - a.batch_size + 1, a.batch_size)]
    if a.batching == "bucketed":
        rng.shuffle(batches)
    needed = a.warmup + max(a.steps, a.predict_steps)
    return [batches[i % len(batches)] for i in range(needed)]  # cycles if there are too few windows


def pad_to(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    batch = dict(batch)
    for key in ("exercises", "responses", "mask"):
        batch[key] = torch.nn.functional.pad(batch[key], (0, length - batch[key].shape[1]))
    return batch


def make_batches(a: argparse.Namespace) -> tuple[list[dict], list[dict], int]:
    """Our batches and pyKT's for the same windows; also the number of exercise ids."""
    sequences = read_three_line(Path(a.data_dir) / a.file)
    num_exercises = max(int(s.exercises.max()) for s in sequences)
    dataset = KTDataset(sequences, a.max_len)
    lengths = np.array([w.end - w.start for w in dataset.windows])
    ours, peer = [], []
    for rows in window_order(lengths, a):
        batch = collate_kt([dataset[int(i)] for i in rows])  # padded to its longest window
        ours.append(pad_to(batch, a.max_len) if a.pad == "max_len" else batch)
        peer.append(pykt_batch(batch if a.pad == "longest" else pad_to(batch, a.max_len)))
    return ours, peer, num_exercises


def pykt_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dict pyKT's ``KTDataset.__getitem__`` (collated) gives for these windows: 0-based ids, pad -1 masked to 0."""
    real = batch["exercises"] > 0  # (B, L)
    concepts = torch.where(real, batch["exercises"] - 1, -1)  # pyKT ids are 0-based, padding -1
    responses = torch.where(real, batch["responses"], -1).float()  # pyKT keeps responses as FloatTensor
    masks = real[:, :-1] & real[:, 1:]  # (B, L-1)
    dcur = {"masks": masks, "smasks": masks.clone()}
    for key, seqs in (("cseqs", concepts), ("rseqs", responses)):
        dcur[key] = seqs[:, :-1] * masks
        dcur["shft_" + key] = seqs[:, 1:] * masks
    dcur["qseqs"], dcur["shft_qseqs"] = dcur["cseqs"], dcur["shft_cseqs"]  # ASSIST2009 as a concept-only dataset
    dcur["tseqs"] = dcur["shft_tseqs"] = torch.empty(0)
    return dcur


def build_models(name: str, num_exercises: int, a: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    PyKTSAKT, PyKTDKT, PyKTAKT, _ = import_pykt()
    torch.manual_seed(a.seed)
    if name == "sakt":
        ours = SAKT(num_exercises, a.sakt_d_model, a.sakt_heads, a.sakt_layers, a.max_len, a.sakt_dropout)
        peer = PyKTSAKT(num_exercises, a.max_len, a.sakt_d_model, a.sakt_heads, a.sakt_dropout, num_en=a.sakt_layers)
    elif name == "akt":
        # pyKT's n_blocks: that many interaction-encoder blocks and as many (question attention, retrieval) pairs;
        # ours: as many blocks in each of the question encoder, interaction encoder and retriever (see the docstring).
        ours = AKT(
            num_exercises,
            d_model=a.akt_d_model,
            num_heads=a.akt_heads,
            d_ff=a.akt_d_ff,
            num_encoder_layers=a.akt_blocks,
            num_retriever_layers=a.akt_blocks,
            dropout=a.akt_dropout,
        )
        peer = PyKTAKT(
            num_exercises,
            0,  # n_pid: concept ids only, no Rasch embeddings
            a.akt_d_model,
            a.akt_blocks,
            a.akt_dropout,
            d_ff=a.akt_d_ff,
            final_fc_dim=a.akt_final_fc_dim,
            num_attn_heads=a.akt_heads,
        )
    else:
        ours = DKT(num_exercises, hidden_size=a.dkt_hidden, embedding_dim=a.dkt_hidden, dropout=a.dkt_dropout)
        peer = PyKTDKT(num_exercises, a.dkt_hidden, dropout=a.dkt_dropout)
    return ours, peer


def minor_faults() -> int | None:
    """Minor page faults of this process so far (pages the kernel had to map and zero); ``None`` off Unix."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def alternate(
    ours: Callable[[int], object],
    peer: Callable[[int], object],
    steps: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
) -> dict:
    """Run ``ours(i)`` then ``peer(i)`` for ``i`` in ``range(warmup + steps)``; seconds of the timed steps.

    ``sync`` runs before each step starts and after it ends (``torch.cuda.synchronize`` on a GPU, whose ops return
    before they have run), so that one side's queued kernels are not counted in the other's time. Also counts each
    timed step's minor page faults (under ``"faults"``): fresh memory the step touched, which costs the kernel a
    fault and a page of zeros each and moves a step's time from run to run.
    """
    times: dict[str, list[float]] = {"ours": [], "pykt": []}
    faults: dict[str, list[int]] = {"ours": [], "pykt": []}
    for i in range(warmup + steps):
        for side, step in (("ours", ours), ("pykt", peer)):
            sync()
            before = minor_faults()
            start = time.perf_counter()
            step(i)
            sync()
            if i >= warmup:
                times[side].append(time.perf_counter() - start)
                if before is not None:
                    faults[side].append(minor_faults() - before)
    return {"times": times, "faults": faults}


def summarize(measured: dict, interactions: float) -> dict:
    out = {}
    for side, seconds in measured["times"].items():
        mean = statistics.fmean(seconds)
        out[side] = {
            "s_per_step": round(mean, 5),
            "s_per_step_median": round(statistics.median(seconds), 5),
            "interactions_per_s": round(interactions / mean),
        }
        if measured["faults"][side]:
            out[side]["minor_faults_per_step"] = round(statistics.fmean(measured["faults"][side]))
    out["speedup"] = round(out["pykt"]["s_per_step"] / out["ours"]["s_per_step"], 3)
    out["speedup_median"] = round(out["pykt"]["s_per_step_median"] / out["ours"]["s_per_step_median"], 3)
    return out


def bench_model(name: str, ours_batches: list, peer_batches: list, num_exercises: int, a) -> dict:
    *_, model_forward = import_pykt()
    ours, peer = build_models(name, num_exercises, a)
    ours, peer = ours.to(a.device), peer.to(a.device)
    # pyKT's loss (binary_cross_entropy on probabilities) is refused under CUDA's autocast: only its model's forward
    # runs under it (see the docstring); the instance attribute shadows the class's forward for nn.Module.__call__.
    if a.precision == "bf16":
        peer.forward = torch.autocast(a.device.type, dtype=torch.bfloat16)(peer.forward)
    ours_opt = torch.optim.Adam(ours.parameters(), lr=a.lr)
    peer_opt = torch.optim.Adam(peer.parameters(), lr=a.lr)

    def ours_train(i: int) -> None:
        b = ours_batches[i]
        with autocast(a.device, a.precision):
            loss = masked_bce_with_logits(ours(b["exercises"], b["responses"]), b["responses"], b["mask"])
        ours_opt.zero_grad()
        loss.backward()
        ours_opt.step()

    def peer_train(i: int) -> None:
        loss = model_forward(peer, peer_batches[i])  # pyKT's own forward + loss for its models
        peer_opt.zero_grad()
        loss.backward()
        peer_opt.step()

    def ours_predict(i: int) -> torch.Tensor:
        b = ours_batches[i]
        with torch.no_grad(), autocast(a.device, a.precision):
            return torch.sigmoid(ours(b["exercises"], b["responses"]))

    def peer_predict(i: int) -> torch.Tensor:
        d = peer_batches[i]
        with torch.no_grad():
            if name == "sakt":
                return peer(d["cseqs"].long(), d["rseqs"].long(), d["shft_cseqs"].long())
            if name == "akt":  # as model_forward: the whole sequence in, predictions for positions 1.. out
                whole = {k: torch.cat([d[k][:, :1], d["shft_" + k]], dim=1).long() for k in ("cseqs", "rseqs", "qseqs")}
                return peer(whole["cseqs"], whole["rseqs"], whole["qseqs"])[0][:, 1:]
            y = peer(d["cseqs"].long(), d["rseqs"].long())
            return (y * torch.nn.functional.one_hot(d["shft_cseqs"].long(), peer.num_c)).sum(-1)

    def interactions(steps: int) -> float:
        timed = ours_batches[a.warmup : a.warmup + steps]
        return statistics.fmean(float(b["mask"].sum()) for b in timed)

    sync = synchronizer(a.device)
    ours.train(), peer.train()
    train = summarize(alternate(ours_train, peer_train, a.steps, a.warmup, sync), interactions(a.steps))
    ours.eval(), peer.eval()
    predict = summarize(
        alternate(ours_predict, peer_predict, a.predict_steps, a.warmup, sync), interactions(a.predict_steps)
    )
    return {"train": train, "predict": predict}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(SHARED_DATA / "kt/assist2009"), help="folder of the three-line files")
    p.add_argument("--file", default="train.csv", help="three-line file to cut into windows")
    p.add_argument("--models", default="sakt,dkt", help="comma-separated subset of sakt,dkt,akt")
    p.add_argument("--max-len", type=int, default=200, help="window length = our max_len = pyKT's seq_len")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--pad",
        choices=("max_len", "longest", "ours_longest"),
        default="max_len",
        help="max_len: both sides padded to --max-len (pyKT's loader always is); longest: both padded to the batch's "
        "longest window; ours_longest: ours padded to the longest (what collate_kt does), pyKT's to --max-len",
    )
    p.add_argument(
        "--batching",
        choices=("random", "bucketed"),
        default="random",
        help="random windows per batch, or windows of similar length (bucketed; only useful with a longest padding)",
    )
    p.add_argument(
        "--flush-denormal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.set_flush_denormal(True) for the whole process, both sides (what lit_kt's KTModule does while "
        "fitting on CPU by default); see the docstring",
    )
    p.add_argument("--sakt-d-model", type=int, default=256, help="SAKT width (pyKT emb_size)")
    p.add_argument("--sakt-heads", type=int, default=8)
    p.add_argument("--sakt-layers", type=int, default=1, help="SAKT blocks (pyKT num_en)")
    p.add_argument("--sakt-dropout", type=float, default=0.2)
    p.add_argument("--dkt-hidden", type=int, default=200, help="DKT hidden and embedding width (pyKT emb_size)")
    p.add_argument("--dkt-dropout", type=float, default=0.1)
    p.add_argument("--akt-d-model", type=int, default=256, help="AKT width (pyKT d_model)")
    p.add_argument("--akt-heads", type=int, default=8, help="AKT heads (pyKT num_attn_heads)")
    p.add_argument("--akt-d-ff", type=int, default=256, help="AKT feed-forward width (pyKT d_ff; ours: also its head)")
    p.add_argument(
        "--akt-blocks",
        type=int,
        default=1,
        help="pyKT n_blocks; ours gets num_encoder_layers = num_retriever_layers = this (see the docstring)",
    )
    p.add_argument("--akt-dropout", type=float, default=0.05)
    p.add_argument("--akt-final-fc-dim", type=int, default=512, help="pyKT's output MLP width (final_fc_dim)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=10, help="timed training steps of each side")
    p.add_argument("--predict-steps", type=int, default=10, help="timed predict steps of each side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each side before the timed ones")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides run (see the docstring)")
    p.add_argument(
        "--precision",
        choices=("32", "bf16"),
        default="32",
        help="32: float32; bf16: torch.autocast to bfloat16 around the forward (and our loss) on both sides",
    )
    p.add_argument("--threads", default="1,0", help="comma-separated torch thread counts to run; 0 = torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    if not a.models or set(a.models) - set(MODELS):
        p.error(
            f"Expected `--models` to be a comma-separated subset of {','.join(MODELS)} but got {','.join(a.models)!r}."
        )
    a.threads = [int(t) for t in a.threads.split(",")]
    for name in ("max_len", "batch_size", "steps", "predict_steps"):
        if getattr(a, name) < 1:
            p.error(f"Expected `--{name.replace('_', '-')}` to be >= 1 but got {getattr(a, name)}.")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.flush_denormal:
        # Before anything starts torch's intra-op thread pool: the flag is per thread, and pool threads created
        # later inherit it (set after, it reaches the calling thread only).
        torch.set_flush_denormal(True)
    import_pykt()  # fail early, with the install command
    a.device = resolve_device(a.device)
    pin_pykt_device(a.device)
    default_threads = torch.get_num_threads()
    start = time.perf_counter()
    ours_batches, peer_batches, num_exercises = make_batches(a)
    # On the device before any timed step: the steps time the models, not the copies.
    ours_batches = [to_device(b, a.device) for b in ours_batches]
    peer_batches = [to_device(b, a.device) for b in peer_batches]
    runs = {}
    for threads in a.threads:
        torch.set_num_threads(threads or default_threads)
        key = f"threads_{torch.get_num_threads()}"
        runs[key] = {name: bench_model(name, ours_batches, peer_batches, num_exercises, a) for name in a.models}
        for name, r in runs[key].items():
            print(
                f"[{key}] {name}: train {r['train']['ours']['s_per_step']:.4f} s/step ours vs"
                f" {r['train']['pykt']['s_per_step']:.4f} pyKT (x{r['train']['speedup']}); predict"
                f" {r['predict']['ours']['s_per_step']:.4f} vs {r['predict']['pykt']['s_per_step']:.4f}"
                f" (x{r['predict']['speedup']})"
                + (
                    f"; train minor page faults/step {r['train']['ours']['minor_faults_per_step']} ours,"
                    f" {r['train']['pykt']['minor_faults_per_step']} pyKT"
                    if "minor_faults_per_step" in r["train"]["ours"]
                    else ""
                ),
                flush=True,
            )
    first = runs[next(iter(runs))]
    real = torch.cat([b["mask"].sum(1) for b in ours_batches]).float()
    result = {
        **{f"{m}_speedup": first[m]["train"]["speedup"] for m in a.models},
        **{f"{m}_predict_speedup": first[m]["predict"]["speedup"] for m in a.models},
        "runs": runs,
        "dataset": f"{Path(a.data_dir).resolve().name}/{a.file}",
        "num_exercises": num_exercises,
        "mean_real_interactions_per_window": round(float(real.mean()), 1),
        "mean_padded_length": {
            "ours": round(statistics.fmean(b["exercises"].shape[1] for b in ours_batches), 1),
            "pykt": round(statistics.fmean(b["cseqs"].shape[1] + 1 for b in peer_batches), 1),
        },
        "settings": {
            k: getattr(a, k)
            for k in (
                "max_len",
                "batch_size",
                "pad",
                "batching",
                "flush_denormal",
                "sakt_d_model",
                "sakt_heads",
                "sakt_layers",
                "sakt_dropout",
                "dkt_hidden",
                "dkt_dropout",
                "akt_d_model",
                "akt_heads",
                "akt_d_ff",
                "akt_blocks",
                "akt_dropout",
                "akt_final_fc_dim",
                "lr",
                "steps",
                "predict_steps",
                "warmup",
                "seed",
            )
        },
        "pykt_version": dist_version("pykt-toolkit"),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine(a.device.type),
        "device": device_name(a.device),
        "device_type": a.device.type,
        "precision": a.precision,
    }
    return emit(result, a.json)


if __name__ == "__main__":
    main()
