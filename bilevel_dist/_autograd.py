"""``torch.autograd.grad`` minus its Python preamble, for the oracles' hot path.

``torch.autograd.grad`` normalises its arguments, checks for ``__torch_function__`` overrides and
validates shapes in Python before it calls the engine: about 8 µs a call on a CPU, about the
cost of a small model's backward op. An AID step makes 40 such calls. Here plain tensors go
straight to the engine, which checks the shapes itself; anything else (tensor subclasses, a
torch without the engine entry point) goes through ``torch.autograd.grad``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)


def grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None = None,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph, create_graph,
    allow_unused=True)``: ``None`` for an input that does not enter."""
    outputs, inputs = tuple(outputs), tuple(inputs)
    retain = create_graph if retain_graph is None else retain_graph
    plain = _ENGINE is not None and not torch._C._has_torch_function(outputs + inputs)
    if plain and grad_outputs is None:
        if any(o.numel() != 1 for o in outputs):
            plain = False  # torch.autograd.grad says why it cannot create them
        else:
            grad_outputs = tuple(torch.ones_like(o, memory_format=torch.preserve_format) for o in outputs)
    if not plain:
        return torch.autograd.grad(
            outputs, inputs, grad_outputs, retain_graph=retain, create_graph=create_graph, allow_unused=True
        )
    return _ENGINE.run_backward(outputs, tuple(grad_outputs), retain, create_graph, inputs, True, accumulate_grad=False)
