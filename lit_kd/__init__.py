"""Knowledge distillation with PyTorch Lightning: one module distils any teacher into any student, and a callback adds
distillation to a LightningModule of your own."""

from lit_kd.adaptors import ModelView, call_model, causal_lm_adaptor, default_adaptor, token_adaptor
from lit_kd.callback import DistillationCallback
from lit_kd.config import DistillationConfig, IntermediateMatch
from lit_kd.distiller import Distiller
from lit_kd.export import load_student, save_model, unwrap_model
from lit_kd.finetune import ClassifierModule
from lit_kd.fused import fused_linear_divergence
from lit_kd.lm import CausalLMModule
from lit_kd.lm_data import LanguageModelingDataModule
from lit_kd.losses import forward_kl, generalized_jsd, reverse_kl, total_variation
from lit_kd.module import DistillationModule

__all__ = [
    "CausalLMModule",
    "ClassifierModule",
    "DistillationCallback",
    "DistillationConfig",
    "DistillationModule",
    "Distiller",
    "IntermediateMatch",
    "LanguageModelingDataModule",
    "ModelView",
    "call_model",
    "causal_lm_adaptor",
    "default_adaptor",
    "forward_kl",
    "fused_linear_divergence",
    "generalized_jsd",
    "load_student",
    "reverse_kl",
    "save_model",
    "token_adaptor",
    "total_variation",
    "unwrap_model",
]
