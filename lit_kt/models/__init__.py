"""Knowledge-tracing models: plain ``nn.Module``s usable without Lightning."""

from lit_kt.models.dkt import DKT
from lit_kt.models.sakt import SAKT, SAKTBlock

__all__ = ["DKT", "SAKT", "SAKTBlock"]
