"""Arithmetic on trees: ``dict[str, Tensor]``, the form ``torch.func.functional_call`` takes.

When a tree is *batched*, every tensor carries a leading axis of independent problems and the
reductions (``dot``, ``norm``) return one value per problem, shape ``(B,)``; otherwise they
return a 0-d tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

Tree = dict[str, Tensor]


def add(a: Tree, b: Tree) -> Tree:
    """``a + b``."""
    return {k: a[k] + b[k] for k in a}


def sub(a: Tree, b: Tree) -> Tree:
    """``a - b``."""
    return {k: a[k] - b[k] for k in a}


def zeros_like(a: Tree) -> Tree:
    """A tree of zeros shaped like ``a``."""
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Tree) -> Tree:
    """Detached copies sharing storage."""
    return {k: v.detach() for k, v in a.items()}


def per_problem(s: Tensor | float, like: Tensor, batched: bool) -> Tensor | float:
    """Reshapes a per-problem value ``(B,)`` so that it broadcasts against ``like``."""
    if batched and isinstance(s, Tensor) and s.ndim == 1:
        return s.reshape(s.shape + (1,) * (like.ndim - 1))
    return s


def scale(a: Tree, s: Tensor | float, batched: bool = False) -> Tree:
    """``s * a`` where ``s`` is a number, a 0-d tensor or one value per problem."""
    if not batched:
        return {k: s * v for k, v in a.items()}
    return {k: per_problem(s, v, batched) * v for k, v in a.items()}


def axpy(s: Tensor | float, x: Tree, y: Tree, batched: bool = False) -> Tree:
    """``y + s * x``."""
    if not batched:
        return {k: y[k] + s * x[k] for k in y}
    return {k: y[k] + per_problem(s, x[k], batched) * x[k] for k in y}


def dot(a: Tree, b: Tree, batched: bool = False) -> Tensor:
    """Inner product over every entry, per problem when batched."""
    return total([(a[k] * b[k]).flatten(1).sum(-1) for k in a] if batched else [(a[k] * b[k]).sum() for k in a])


def total(parts: list[Tensor]) -> Tensor | float:
    """``parts[0] + parts[1] + ...`` (``0.0`` for none), without ``sum()``'s extra ``0 +`` op."""
    if not parts:
        return 0.0
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


def norm(a: Tree, batched: bool = False) -> Tensor:
    """Euclidean norm over every entry, per problem when batched."""
    return dot(a, a, batched).sqrt()


def where(mask: Tensor, a: Tree, b: Tree, batched: bool = False) -> Tree:
    """``a`` where ``mask`` (one flag per problem, or a 0-d flag) holds, else ``b``."""
    return {k: torch.where(per_problem(mask, a[k], batched), a[k], b[k]) for k in a}  # type: ignore[arg-type]


def numel(a: Tree, batched: bool = False) -> int:
    """Number of entries, per problem when batched."""
    return sum(v[0].numel() if batched else v.numel() for v in a.values())


def flatten(a: Tree, batched: bool = False) -> Tensor:
    """Concatenates the entries into ``(n,)``, or ``(B, n)`` when batched."""
    if batched:
        return torch.cat([v.flatten(1) for v in a.values()], dim=1)
    return torch.cat([v.flatten() for v in a.values()])


def unflatten(flat: Tensor, like: Tree, batched: bool = False) -> Tree:
    """Inverse of :func:`flatten`; extra leading axes of ``flat`` are kept in front."""
    out, offset = {}, 0
    for k, v in like.items():
        shape = v.shape[1:] if batched else v.shape
        size = shape.numel()
        out[k] = flat[..., offset : offset + size].reshape(flat.shape[:-1] + shape)
        offset += size
    return out


def basis(like: Tree) -> Tree:
    """The identity as a tree: one direction per entry of ``like``, stacked on a new leading axis."""
    ref = next(iter(like.values()))
    return unflatten(torch.eye(numel(like), dtype=ref.dtype, device=ref.device), like)
