"""Knowledge distillation with PyTorch Lightning: one module distils any teacher into any student."""

from lit_kd.adaptors import ModelView, call_model, default_adaptor, kt_adaptor
from lit_kd.config import DistillationConfig, IntermediateMatch
from lit_kd.finetune import ClassifierModule
from lit_kd.module import DistillationModule

__all__ = [
    "ClassifierModule",
    "DistillationConfig",
    "DistillationModule",
    "IntermediateMatch",
    "ModelView",
    "call_model",
    "default_adaptor",
    "kt_adaptor",
]
