"""A one-layer LSTM over embedded tokens on packed rows, for DKT's CPU path.

:class:`torch.nn.LSTM` computes ``W_ih x_t + b`` for every step inside the recurrence, and on a right-padded batch it
runs every padded step too. DKT's LSTM input is an embedding of one of a few hundred interaction ids, so
``W_ih x + b`` takes only as many values as there are ids: DKT projects the embedding table once per step
(:meth:`~lit_kt.models.DKT.forward`) and :class:`PackedLSTM` gathers the projected row of each input token as it
goes, running only the recurrence ``h_{t-1} -> h_t`` on the real positions.

Layout: time-major packed rows, as in :class:`torch.nn.utils.rnn.PackedSequence`. The samples are sorted by length,
longest first; step ``t`` holds the ``batch_sizes[t]`` samples still running, in that order, so the rows of step
``t + 1`` are a prefix of those of step ``t`` and every slice below is a view (no padding, no copies).

Gates follow :class:`torch.nn.LSTM` (order i, f, g, o; ``weight_hh`` its ``weight_hh_l0``), the state starts at zero:

    gates = table[ids_t] + h_{t-1} W_hh^T;  i, f, o = sigmoid(.);  g = tanh(.)
    c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)

The forward pass computes ``tanh(x)`` as ``2 sigmoid(2x) - 1`` (torch's CPU ``tanh`` costs about six ``sigmoid``
per element), doubling the g gate's weights instead of its inputs and keeping ``2 c``, so that each step is one
product and seven elementwise calls. Backward: only ``dh`` and ``dc`` are sequential. Every factor that multiplies
them (``o (1 - tanh(c)^2)``, ``g i (1 - i)``, ``f (1 - f)``, ``i (1 - g^2)``, ``tanh(c) o (1 - o)``) is computed for
all rows at once before the loop, and ``dW_hh`` is one product over all rows after it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _step_offsets(batch_sizes: list[int]) -> list[int]:
    offsets = [0]
    for n in batch_sizes:
        offsets.append(offsets[-1] + n)
    return offsets


def previous_rows(batch_sizes: list[int], device: torch.device) -> Tensor:
    """(S - batch_sizes[0],) for every packed row of steps 1.., the row of the same sample at the step before."""
    sizes = torch.tensor(batch_sizes, device=device)  # (T,)
    rows = torch.arange(batch_sizes[0], int(sizes.sum()), device=device)  # rows of steps 1..T-1
    return rows - sizes[:-1].repeat_interleave(sizes[1:])  # row j of step t sits n_{t-1} rows after row j of t-1


class PackedLSTM(torch.autograd.Function):
    """``h`` (S, H) of a one-layer LSTM whose input gates are ``table[ids]`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, table: Tensor, ids: Tensor, weight_hh: Tensor, batch_sizes: list[int]) -> Tensor:
        S, (V, G) = ids.shape[0], table.shape
        H = G // 4
        scale = table.new_ones(G)
        scale[2 * H : 3 * H] = 2  # the g gate's pre-activation doubled: tanh(z) = 2 sigmoid(2z) - 1
        table2 = table * scale  # (V, 4H)
        w2_t = (weight_hh * scale[:, None]).t()  # (H, 4H)
        act = table.new_empty(S, G)  # (S, 4H) i, f, sigmoid(2 z_g), o
        c2 = table.new_empty(S, H)  # (S, H) twice the cell state
        sig_c = table.new_empty(S, H)  # (S, H) sigmoid(2c) = (1 + tanh(c)) / 2
        h = table.new_empty(S, H)  # (S, H)
        # One view per step of each packed tensor, cut in one call each (fewer Python-side slices in the loop).
        steps = zip(*(x.split(batch_sizes) for x in (ids, act, c2, sig_c, h)))
        c_prev = h_prev = None
        for ids_t, a, c_t, sig_t, h_t in steps:
            n = a.shape[0]
            torch.index_select(table2, 0, ids_t, out=a)  # (n, 4H)
            if h_prev is not None:
                a.addmm_(h_prev[:n], w2_t)
            a.sigmoid_()
            i, f, s_g, o = a.chunk(4, dim=1)  # 4 x (n, H); g = 2 s_g - 1
            if c_prev is None:  # step 0: the state is zero
                torch.mul(i, s_g, out=c_t).mul_(4)
            else:
                torch.mul(f, c_prev[:n], out=c_t).addcmul_(i, s_g, value=4)
            c_t.sub_(i, alpha=2)  # 2c = f 2c_prev + 2 i (2 s_g - 1)
            torch.sigmoid(c_t, out=sig_t)
            torch.addcmul(o, o, sig_t, value=2, out=h_t).sub_(o, alpha=2)  # o (2 sigmoid(2c) - 1)
            c_prev, h_prev = c_t, h_t
        ctx.save_for_backward(ids, act, c2, sig_c, h, weight_hh)
        ctx.batch_sizes, ctx.num_ids = batch_sizes, V
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        ids, act, c2, sig_c, h, weight_hh = ctx.saved_tensors
        batch_sizes = ctx.batch_sizes
        S, G = act.shape
        H = G // 4
        B0 = batch_sizes[0]
        i, f, s_g, o = act.chunk(4, dim=1)  # 4 x (S, H) views
        g = s_g * 2 - 1  # (S, H)
        tanh_c = sig_c * 2 - 1  # (S, H)
        # Factors of the sequential gradients, all rows at once (fused where torch has the op):
        # dc_t = dh_t * from_h + dc_{t+1} * f_{t+1};  d(o) = dh_t * to_o;  d(i, f, g) = dc_t * to_gates (f: times
        # 2 c_{t-1} in the loop, where it is a view; hence the 1/2 here).
        o_tanh = o * tanh_c  # (S, H)
        from_h = torch.addcmul(o, o_tanh, tanh_c, value=-1)  # o (1 - tanh(c)^2)
        to_o = torch.addcmul(o_tanh, o_tanh, o, value=-1)  # tanh(c) o (1 - o)
        to_gates = act.new_empty(S, 3, H)
        torch.addcmul(i, i, i, value=-1, out=to_gates[:, 0]).mul_(g)  # g i (1 - i)
        torch.addcmul(f, f, f, value=-1, out=to_gates[:, 1]).mul_(0.5)  # f (1 - f) / 2
        torch.addcmul(i, i * g, g, value=-1, out=to_gates[:, 2])  # i (1 - g^2)
        grad_gates = torch.empty_like(act)  # (S, 4H)
        dh = grad_h.contiguous().clone()  # (S, H) grows by the recurrent terms, step by step
        dc = torch.empty_like(c2)  # (S, H)
        steps = list(zip(*(x.split(batch_sizes) for x in (grad_gates, dh, dc, from_h, to_o, to_gates, f, c2))))
        for t in range(len(steps) - 1, -1, -1):
            dg, dh_t, dc_t, from_h_t, to_o_t, to_gates_t, _, _ = steps[t]
            n = dg.shape[0]
            torch.mul(dh_t, from_h_t, out=dc_t)
            if t + 1 < len(steps):
                _, _, dc_next, _, _, _, f_next, _ = steps[t + 1]
                dc_t[: dc_next.shape[0]].addcmul_(dc_next, f_next)
            torch.mul(dc_t.unsqueeze(1), to_gates_t, out=dg[:, : 3 * H].view(n, 3, H))
            torch.mul(dh_t, to_o_t, out=dg[:, 3 * H :])
            if t > 0:
                _, dh_prev, _, _, _, _, _, c2_prev = steps[t - 1]
                dg[:, H : 2 * H].mul_(c2_prev[:n])
                dh_prev[:n].addmm_(dg, weight_hh)  # dh_{t-1} += dgates_t W_hh
            else:
                dg[:, H : 2 * H].zero_()  # c_{-1} = 0
        grad_table = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_table = grad_gates.new_zeros(ctx.num_ids, G).index_add_(0, ids, grad_gates)  # (V, 4H)
        if ctx.needs_input_grad[2]:
            grad_w = torch.zeros_like(weight_hh)  # (4H, H)
            if len(batch_sizes) > 1:  # sum over steps 1.. of dgates_t^T h_{t-1}, one product
                grad_w = grad_gates[B0:].t() @ h[previous_rows(batch_sizes, h.device)]
        return grad_table, None, grad_w, None


def packed_lstm(table: Tensor, ids: Tensor, weight_hh: Tensor, batch_sizes: list[int]) -> Tensor:
    """The hidden states of a one-layer, zero-initialised LSTM over time-major packed rows of tokens.

    Args:
        table: (V, 4H) ``W_ih x + b_ih + b_hh`` of every token (gate order i, f, g, o).
        ids: (S,) the token of every packed row, indices into ``table``.
        weight_hh: (4H, H) the recurrent weight (``nn.LSTM.weight_hh_l0``).
        batch_sizes: Samples running at each step: positive, non-increasing, summing to S (host integers: the loop
            is cut on the host).

    Returns:
        (S, H) ``h_t`` of every packed row, the same layout. Gradients reach ``table`` and ``weight_hh``.
    """
    if table.dim() != 2 or table.shape[1] != 4 * weight_hh.shape[1] or weight_hh.shape[0] != table.shape[1]:
        raise ValueError(
            f"Expected `table` (V, 4H) and `weight_hh` (4H, H) but got {tuple(table.shape)} and "
            f"{tuple(weight_hh.shape)}."
        )
    if ids.dim() != 1 or ids.dtype != torch.long:
        raise ValueError(f"Expected `ids` to be a 1-D int64 tensor but got {ids.dtype} of shape {tuple(ids.shape)}.")
    if (
        not batch_sizes
        or sum(batch_sizes) != ids.shape[0]
        or batch_sizes[-1] < 1
        or any(b > a for a, b in zip(batch_sizes, batch_sizes[1:]))
    ):
        raise ValueError(
            f"Expected positive, non-increasing `batch_sizes` summing to the {ids.shape[0]} packed rows but got "
            f"{batch_sizes}."
        )
    return PackedLSTM.apply(table, ids, weight_hh, batch_sizes)
