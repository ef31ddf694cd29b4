"""AKT: Context-Aware Attentive Knowledge Tracing (Ghosh, Heffernan & Lan, KDD 2020).

Three attention stacks, each of blocks "monotonic attention, residual + layer norm, feed-forward, residual + layer
norm":

* the *question encoder* contextualises the question embeddings ``x``: position ``t`` attends to questions
  ``<= t`` (it may see the question being predicted, never its response);
* the *interaction encoder* contextualises the interaction (question and response) embeddings ``y``: position
  ``t`` attends to interactions ``<= t``;
* the *knowledge retriever* has the encoded questions as queries and keys and the encoded interactions as values,
  and attends to *strictly* past positions (``< t``), so the response at ``t`` never reaches prediction ``t``.
  Position 0 has no past: its attention output is defined as zero (the paper pads that row with zeros), so its
  prediction comes from the question alone through the residual connection.

The prediction is an MLP over ``[retrieved knowledge; question embedding]``.

Monotonic attention (the paper's section 3.3): the scaled dot-product score of query ``t`` and key ``tau`` is
multiplied by ``exp(-theta * d(t, tau))``, with a learned decay ``theta >= 0`` per head (a softplus keeps it
non-negative) and the context-aware distance ``d(t, tau) = |t - tau| * sum_{tau < t' <= t} gamma_{t, t'}``, where
``gamma`` is the softmax of the undecayed scores over the keys the query may see; ``d`` is computed without gradient,
as in the paper. Because the decay multiplies the score, it shrinks a score towards 0 rather than to minus infinity:
past positions lose weight when their scores are positive (see :func:`monotonic_attention`).

Rasch embeddings (section 3.4), used when question ids are given: ``x_t = c_{c_t} + mu_{q_t} d_{c_t}`` and
``y_t = e_{(c_t, r_t)} + mu_{q_t} f_{(c_t, r_t)}``, with ``c_t`` the concept (here the "exercise" id of the KT
forward contract), ``q_t`` the question, ``mu`` a scalar difficulty per question and ``d``, ``f`` variation vectors
per concept and per (concept, response). ``mu`` starts at 0, where the model equals its concept-only form;
:meth:`AKT.regularization` gives the L2 penalty ``sum(mu^2)`` on it.

No position embedding: the decay already encodes how far apart two positions are, so sequences of any length are
accepted (``max_len`` is ``None``; memory grows as ``L^2`` per head).

Padding is id 0 at the end of each row (right padding). Every attention is causal, so padding never reaches a real
position; logits at padded positions are meaningless and must be masked out by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_kt.models.dropout import FastDropout, fast_dropout
from lit_kt.models.padding import may_skip_padding, row_lengths


def monotonic_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    strict: bool,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[Tensor, Tensor]:
    """Causal scaled dot-product attention whose scores decay with the context-aware distance (AKT, eq. 2-3).

    Args:
        q: (B, H, L, Dh) queries.
        k: (B, H, L, Dh) keys.
        v: (B, H, L, Dh) values.
        theta: (H,) non-negative decay rate per head.
        strict: Attend to keys ``< t`` (the knowledge retriever) instead of ``<= t`` (the encoders). Query 0 then
            sees nothing: its weights and output are 0.
        dropout: Dropout on the attention weights.
        training: Whether dropout applies.

    Returns:
        The output (B, H, L, Dh) and the weights (B, H, L, L) before dropout (rows sum to 1, or are all 0).
    """
    L = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, L, L)
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device).tril_(-1 if strict else 0)  # (L, L) key <= / < t
    # The finite fill keeps a row with no allowed key (query 0 when strict) free of NaNs; it is zeroed below.
    fill = torch.finfo(scores.dtype).min
    with torch.no_grad():
        gamma = scores.masked_fill(~allowed, fill).softmax(dim=-1).masked_fill_(~allowed, 0.0)  # (B, H, L, L)
        # Mass strictly after tau up to the last allowed key: the row total minus the running sum up to tau.
        after = gamma.sum(dim=-1, keepdim=True) - gamma.cumsum(dim=-1)  # (B, H, L, L)
        positions = torch.arange(L, device=q.device)
        gap = (positions[:, None] - positions[None, :]).abs().to(scores.dtype)  # (L, L) |t - tau|
        distance = (after * gap).clamp_(min=0.0)  # (B, H, L, L); the clamp removes cumsum round-off below 0
    decay = torch.exp(-theta.view(-1, 1, 1) * distance)  # (B, H, L, L), in (0, 1], differentiable in theta
    weights = (scores * decay).masked_fill(~allowed, fill).softmax(dim=-1).masked_fill(~allowed, 0.0)
    out = fast_dropout(weights, dropout, training) @ v  # (B, H, L, Dh)
    return out, weights


class AKTBlock(nn.Module):
    """Monotonic multi-head attention, residual + layer norm, feed-forward, residual + layer norm.

    Queries and keys share one projection: in every AKT attention they come from the same sequence (encoded
    questions, or encoded interactions), so the score is a learned similarity between positions.

    Args:
        d_model: Width of the inputs and outputs.
        num_heads: Attention heads; must divide ``d_model``.
        d_ff: Hidden width of the feed-forward layer.
        dropout: Dropout after each sub-layer and on the attention weights.
        strict: Attend to strictly past positions (the knowledge retriever) rather than to positions ``<= t``.
    """

    def __init__(
        self, d_model: int = 64, num_heads: int = 4, d_ff: int = 128, dropout: float = 0.1, strict: bool = False
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.strict = strict
        self.qk_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        # theta = softplus(raw); heads start on time scales from slow (0.01) to fast (1) so that some look far back.
        theta0 = torch.logspace(-2, 0, num_heads)  # (H,)
        self.theta_raw = nn.Parameter(torch.log(torch.expm1(theta0)))
        self.attn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), FastDropout(dropout), nn.Linear(d_ff, d_model))
        self.ffn_norm = nn.LayerNorm(d_model)
        self.drop = FastDropout(dropout)

    @property
    def theta(self) -> Tensor:
        """(H,) the decay rate of each head, ``>= 0``."""
        return F.softplus(self.theta_raw)

    def forward(self, query: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Attend from ``query`` (B, L, D), which also gives the keys, to ``values`` (B, L, D).

        Returns:
            The output (B, L, D) and the attention weights (B, H, L, L).
        """
        B, L, D = query.shape
        H = self.num_heads
        qk = self.qk_proj(query).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, D/H)
        v = self.v_proj(values).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, D/H)
        attn, weights = monotonic_attention(qk, qk, v, self.theta, self.strict, self.dropout, self.training)
        attn = self.out_proj(attn.transpose(1, 2).reshape(B, L, D))  # (B, L, D); 0-weight rows give the bias only
        x = self.attn_norm(query + self.drop(attn))
        return self.ffn_norm(x + self.drop(self.ffn(x))), weights


class AKT(nn.Module):
    """Context-aware attentive knowledge tracing, with Rasch embeddings when question ids are given.

    Args:
        num_exercises: Number of concept ("exercise") ids; ids run from 1 to ``num_exercises`` and 0 is padding.
        num_questions: Number of question ids for the Rasch embeddings (1..num_questions, 0 padding); 0 for none
            (concept ids only, as in the three-line data sets).
        d_model: Embedding and hidden width (the paper: 256; 64 keeps a 2-core CPU epoch on ASSIST2009 short).
        num_heads: Attention heads; must divide ``d_model`` (the paper: 8).
        d_ff: Feed-forward hidden width in the blocks and the output MLP.
        num_encoder_layers: Blocks in each of the two encoders (the paper: 1).
        num_retriever_layers: Blocks in the knowledge retriever (the paper: 2).
        dropout: Dropout in the blocks, on the attention weights and in the output MLP (the paper: 0.05).

    Fast path: on CPU (outside ``torch.compile``) a batch is cut to its longest row before the attention, and
    the logits after that are 0; elsewhere the padded tensors run as they are.

    Example:
        >>> model = AKT(num_exercises=50, d_model=32, num_heads=4)
        >>> exercises = torch.randint(1, 51, (2, 20)); responses = torch.randint(0, 2, (2, 20))
        >>> model(exercises, responses).shape
        torch.Size([2, 20])
    """

    def __init__(
        self,
        num_exercises: int,
        num_questions: int = 0,
        d_model: int = 64,
        num_heads: int = 4,
        d_ff: int = 128,
        num_encoder_layers: int = 1,
        num_retriever_layers: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_exercises < 1 or num_questions < 0:
            raise ValueError(
                f"Expected `num_exercises` >= 1 and `num_questions` >= 0 but got {num_exercises} and {num_questions}."
            )
        if d_model % num_heads != 0:
            raise ValueError(f"Expected `d_model` ({d_model}) to be divisible by `num_heads` but got {num_heads}.")
        if num_encoder_layers < 0 or num_retriever_layers < 1:
            raise ValueError(
                "Expected `num_encoder_layers` >= 0 and `num_retriever_layers` >= 1 but got "
                f"{num_encoder_layers} and {num_retriever_layers}."
            )
        self.config = dict(
            num_exercises=num_exercises,
            num_questions=num_questions,
            d_model=d_model,
            num_heads=num_heads,
            d_ff=d_ff,
            num_encoder_layers=num_encoder_layers,
            num_retriever_layers=num_retriever_layers,
            dropout=dropout,
        )
        self.num_exercises = num_exercises
        self.num_questions = num_questions
        self.max_len = None  # no position embedding: the decay encodes distance
        # Interaction id = concept + num_exercises * response, so 1..2E; id 0 (padding) gets a zero vector.
        self.concept_emb = nn.Embedding(num_exercises + 1, d_model, padding_idx=0)
        self.interaction_emb = nn.Embedding(2 * num_exercises + 1, d_model, padding_idx=0)
        if num_questions:
            self.difficulty = nn.Embedding(num_questions + 1, 1, padding_idx=0)  # mu, a scalar per question
            nn.init.zeros_(self.difficulty.weight)  # start at the concept-only model
            self.concept_var = nn.Embedding(num_exercises + 1, d_model, padding_idx=0)  # d_c
            self.interaction_var = nn.Embedding(2 * num_exercises + 1, d_model, padding_idx=0)  # f_(c, r)
        self.question_encoder = nn.ModuleList(
            AKTBlock(d_model, num_heads, d_ff, dropout) for _ in range(num_encoder_layers)
        )
        self.interaction_encoder = nn.ModuleList(
            AKTBlock(d_model, num_heads, d_ff, dropout) for _ in range(num_encoder_layers)
        )
        self.retriever = nn.ModuleList(
            AKTBlock(d_model, num_heads, d_ff, dropout, strict=True) for _ in range(num_retriever_layers)
        )
        self.head = nn.Sequential(
            nn.Linear(2 * d_model, d_ff),
            nn.ReLU(),
            FastDropout(dropout),
            nn.Linear(d_ff, d_ff // 2),
            nn.ReLU(),
            FastDropout(dropout),
            nn.Linear(d_ff // 2, 1),
        )

    def regularization(self) -> Tensor:
        """The L2 penalty ``sum(mu^2)`` on the question difficulties (0 without questions); scale it by ``l2``."""
        if not self.num_questions:
            return self.concept_emb.weight.new_zeros(())
        return self.difficulty.weight.square().sum()

    def forward(
        self, exercises: Tensor, responses: Tensor, questions: Tensor | None = None, return_attention: bool = False
    ):
        """Predict the correctness of every position from the history before it.

        Args:
            exercises: (B, L) concept ids, 1..num_exercises, right-padded with 0.
            responses: (B, L) 0/1 correctness (values at padded positions are ignored).
            questions: (B, L) question ids, 1..num_questions, padded with 0, for the Rasch embeddings; ``None``
                for the concept-only embeddings (all ``mu = 0``).
            return_attention: Also return the knowledge retriever's attention weights, a list of (B, H, L, L)
                tensors, one per block (row 0 is all zeros).

        Returns:
            (B, L) logits, where ``logits[:, t]`` predicts ``responses[:, t]`` from ``exercises[:, :t+1]``,
            ``questions[:, :t+1]`` and ``responses[:, :t]``; with ``return_attention`` a tuple
            ``(logits, weights)``.
        """
        B, L = exercises.shape
        if questions is not None:
            if not self.num_questions:
                raise ValueError("Expected `questions` to be None for a model built with num_questions=0.")
            if questions.shape != exercises.shape:
                raise ValueError(
                    f"Expected `questions` of the shape of `exercises` {tuple(exercises.shape)} but got "
                    f"{tuple(questions.shape)}."
                )
        n = L
        if may_skip_padding(exercises) and not return_attention:
            # Causal attention: nothing after the batch's longest row can reach a real position, so cut it off.
            n = int(row_lengths(exercises).max()) if B else 0
            if n == 0:
                return exercises.new_zeros(B, L, dtype=self.concept_emb.weight.dtype)
            exercises, responses = exercises[:, :n], responses[:, :n]
            questions = None if questions is None else questions[:, :n]
        interactions = exercises + self.num_exercises * responses * (exercises > 0)  # (B, n)
        x = self.concept_emb(exercises)  # (B, n, D)
        y = self.interaction_emb(interactions)  # (B, n, D)
        if questions is not None:
            mu = self.difficulty(questions)  # (B, n, 1)
            x = x + mu * self.concept_var(exercises)
            y = y + mu * self.interaction_var(interactions)
        q_enc, y_enc = x, y
        for block in self.question_encoder:
            q_enc, _ = block(q_enc, q_enc)
        for block in self.interaction_encoder:
            y_enc, _ = block(y_enc, y_enc)
        h = q_enc
        weights = []
        for block in self.retriever:
            h, w = block(h, y_enc)  # queries and keys: the questions so far; values: strictly past interactions
            weights.append(w)
        logits = self.head(torch.cat([h, x], dim=-1)).squeeze(-1)  # (B, n)
        if n < L:
            logits = F.pad(logits, (0, L - n))  # (B, L), 0 after the batch's longest row
        return (logits, weights) if return_attention else logits
