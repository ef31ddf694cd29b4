"""Features by module name: forward hooks that record the outputs of named submodules during a forward pass.

Intermediate matches may name a layer by its dotted module path (``"bert.encoder.layer.5"``) instead of an index into
``hidden_states``; :class:`FeatureCapture` hooks those submodules and keeps their outputs for the loss. A submodule
that returns a tuple or list contributes its first element (``transformers`` layers return ``(hidden, ...)``); one
that returns an object with ``last_hidden_state`` contributes that.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureCapture", "first_tensor", "submodule"]


def submodule(root: nn.Module, path: str, who: str) -> nn.Module:
    """``root.get_submodule(path)`` with an error naming the model and listing a few of its submodules."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in root.named_modules() if name][:12]
        raise ValueError(
            f"Expected {path!r} to name a submodule of the {who} ({type(root).__name__}) but it has none; its "
            f"submodules include {names}."
        ) from None


def first_tensor(output: Any, path: str) -> Tensor:
    """The feature a module's output stands for: itself, its first element, or its ``last_hidden_state``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise ValueError(
        f"Expected the module {path!r} to return a tensor, a tuple starting with one, or an object with "
        f"`last_hidden_state` but got {type(output).__name__}."
    )


class FeatureCapture:
    """Records the outputs of named submodules of ``root`` while enabled.

    The hooks exist only inside ``with capture:`` (registered on entry, removed on exit, previous outputs cleared),
    so other forwards cost nothing extra and the model never keeps a hook that would stop it from pickling.

    Args:
        root: The model whose submodules are named.
        paths: Dotted submodule names (relative to ``root``).
        who: ``"teacher"`` or ``"student"``, for error messages.

    Raises:
        ValueError: If a path names no submodule.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> capture = FeatureCapture(net, ["0"], "student")
        >>> with capture:
        ...     _ = net(torch.zeros(2, 3))
        >>> capture.features["0"].shape
        torch.Size([2, 4])
    """

    def __init__(self, root: nn.Module, paths: Iterable[str], who: str) -> None:
        self.paths = sorted(set(paths))
        self.who = who
        self.features: dict[str, Tensor] = {}
        self._modules = {path: submodule(root, path, who) for path in self.paths}
        self._handles: list[RemovableHandle] = []

    def _hook(self, path: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.features[path] = first_tensor(output, path)

        return hook

    def __enter__(self) -> FeatureCapture:
        self.features = {}
        self._handles = [module.register_forward_hook(self._hook(path)) for path, module in self._modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def collected(self) -> dict[str, Tensor]:
        """The recorded features; every path must have run."""
        missing = [p for p in self.paths if p not in self.features]
        if missing:
            raise ValueError(
                f"Expected the {self.who}'s submodules {missing} to run during its forward pass (an intermediate "
                "match reads their outputs) but they did not."
            )
        return dict(self.features)

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
