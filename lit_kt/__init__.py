"""Knowledge tracing with PyTorch Lightning: SAKT and DKT models, data, a Lightning system and inference."""

from lit_kt.calibration import (
    TemperatureScaling,
    brier_score,
    expected_calibration_error,
    fit_logit_shift,
    fit_temperature,
)
from lit_kt.data import KTDataModule, KTDataset, collate_kt, group_window_spans, window_spans
from lit_kt.distillation import kt_adaptor
from lit_kt.factories import model_from_checkpoint
from lit_kt.formats import KTFormatError, StudentSequence, read_long_table, read_three_line, write_three_line
from lit_kt.inference import predict_next
from lit_kt.losses import masked_bce_with_logits
from lit_kt.mastery import mastery
from lit_kt.models import AKT, DKT, SAKT
from lit_kt.module import AKTModule, DKTModule, KTModule, SAKTModule, fuse_questions, leak_free_logits
from lit_kt.streaming import SAKTStream
from lit_kt.synthetic import SyntheticStudents, generate_students, roc_auc
from lit_kt.writer import PredictionWriter

__all__ = [
    "AKT",
    "AKTModule",
    "DKT",
    "DKTModule",
    "KTDataModule",
    "KTDataset",
    "KTFormatError",
    "KTModule",
    "SAKT",
    "SAKTModule",
    "PredictionWriter",
    "SAKTStream",
    "StudentSequence",
    "SyntheticStudents",
    "TemperatureScaling",
    "brier_score",
    "collate_kt",
    "expected_calibration_error",
    "fit_logit_shift",
    "fit_temperature",
    "fuse_questions",
    "generate_students",
    "group_window_spans",
    "kt_adaptor",
    "leak_free_logits",
    "masked_bce_with_logits",
    "mastery",
    "model_from_checkpoint",
    "predict_next",
    "read_long_table",
    "read_three_line",
    "roc_auc",
    "window_spans",
    "write_three_line",
]
