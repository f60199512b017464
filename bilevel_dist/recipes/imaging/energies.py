"""The learned lower-level cost of Crockett & Fessler's running example (Ex):

    Φ(x; c, β, y) = ½‖Ax − y‖² + e^{β₀} Σ_k e^{β_k} Σ_j φ((c_k ⊛ x)_j; ε),

with ``φ(z) = √(z² + ε²) − ε`` the corner-rounded 1-norm (CR1N, shifted so ``φ(0) = 0``) and
``⊛`` circular cross-correlation (the review's convention, PyTorch's ``conv2d``). Filters
start as the non-constant DCT atoms; two finite-difference filters give (smoothed, anisotropic)
total variation, the TV baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel_dist.recipes.imaging.operators import Identity, Operator, dct_matrix


def dct_filters(size: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The ``size² − 1`` non-constant 2-D DCT-II atoms as ``(K, 1, size, size)`` filters, each of
    norm ``1/size`` (the review's ``kron(D, D)'/√S`` with the DC atom dropped)."""
    c = dct_matrix(size, dtype)
    atoms = torch.einsum("ai,bj->abij", c, c).reshape(size * size, size, size) / size
    return atoms[1:, None]


def tv_filters(dtype: torch.dtype = torch.float64) -> Tensor:
    """Vertical and horizontal forward differences as ``(2, 1, 2, 2)`` filters (anisotropic TV)."""
    filters = torch.zeros(2, 1, 2, 2, dtype=dtype)
    filters[0, 0, 0, 0], filters[0, 0, 1, 0] = -1.0, 1.0
    filters[1, 0, 0, 0], filters[1, 0, 0, 1] = -1.0, 1.0
    return filters


def correlate(x: Tensor, filters: Tensor) -> Tensor:
    """``c_k ⊛ x`` for every filter: ``(B, 1, H, W) → (B, K, H, W)``, periodic boundaries; tap
    ``(s, t)`` of a filter meets pixel ``(i + s − (S−1)//2, j + t − (S−1)//2)``."""
    sh, sw = filters.shape[-2:]
    padded = F.pad(x, ((sw - 1) // 2, sw // 2, (sh - 1) // 2, sh // 2), mode="circular")
    return F.conv2d(padded, filters)


def cr1n(z: Tensor, eps: float) -> Tensor:
    """The corner-rounded 1-norm ``√(z² + ε²) − ε`` element-wise."""
    return torch.sqrt(z * z + eps * eps) - eps


@dataclass(frozen=True)
class FilterEnergy:
    """``Φ(x; c, β, y)`` per image (module docstring). ``beta0`` is the fixed overall log-weight
    (set by a grid or a sweep, not learned, as in the review's D.2)."""

    operator: Operator = Identity()
    eps: float = 0.01
    beta0: float = 0.0

    def data_term(self, x: Tensor, y: Tensor) -> Tensor:
        """``½‖Ax − y‖²`` per image."""
        r = self.operator(x) - y
        return 0.5 * (r.real**2 + r.imag**2 if r.is_complex() else r * r).flatten(1).sum(1)

    def regulariser(self, x: Tensor, filters: Tensor, beta: Tensor) -> Tensor:
        """``e^{β₀} Σ_k e^{β_k} Σ_j φ(c_k ⊛ x)`` per image."""
        weights = math.exp(self.beta0) * torch.exp(beta)
        return (cr1n(correlate(x, filters), self.eps).flatten(2).sum(2) * weights).sum(1)

    def __call__(self, x: Tensor, y: Tensor, filters: Tensor, beta: Tensor) -> Tensor:
        """``Φ`` of each image of ``x`` (``(B, 1, H, W)``) given its measurement ``y``."""
        return self.data_term(x, y) + self.regulariser(x, filters, beta)

    def lipschitz(self, filters: Tensor, beta: Tensor, shape: tuple[int, int]) -> float:
        """Eq. (4.19): ``L = σ₁(A)² + e^{β₀} (1/ε) Σ_k e^{β_k} ‖c_k‖₁²`` bounds ``‖∇²_xx Φ‖``."""
        like = filters.detach()
        l1 = like.abs().flatten(1).sum(1)
        bound = math.exp(self.beta0) / self.eps * float((torch.exp(beta.detach()) * l1 * l1).sum())
        return self.operator.norm_squared(shape, like) + bound


__all__ = ["FilterEnergy", "correlate", "cr1n", "dct_filters", "tv_filters"]
