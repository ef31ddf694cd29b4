"""Knowledge-tracing models: plain ``nn.Module``s usable without Lightning."""

from lit_kt.models.akt import AKT, AKTBlock, monotonic_attention
from lit_kt.models.attention import (
    ChunkedCausalAttention,
    PackedCausalAttention,
    causal_attention,
    packed_causal_attention,
)
from lit_kt.models.dkt import DKT
from lit_kt.models.dropout import FastDropout, fast_dropout
from lit_kt.models.linear import FastLinear, fast_linear
from lit_kt.models.sakt import SAKT, SAKTBlock

__all__ = [
    "AKT",
    "DKT",
    "SAKT",
    "AKTBlock",
    "ChunkedCausalAttention",
    "FastDropout",
    "FastLinear",
    "PackedCausalAttention",
    "SAKTBlock",
    "causal_attention",
    "fast_dropout",
    "fast_linear",
    "monotonic_attention",
    "packed_causal_attention",
]
