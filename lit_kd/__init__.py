"""Knowledge distillation with PyTorch Lightning (in progress, see issue 3)."""

__all__: list[str] = []
