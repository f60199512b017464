"""Reference bilevel problems with closed-form answers, for tests, benchmarks and experiments."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel_dist.problem import BilevelProblem
from bilevel_dist.tree import Tree


@dataclass
class RidgeRegression:
    """Ridge regression with one regularisation weight per feature.

    Inner ``g(w, x) = ‖X w − y‖²/(2n) + ½ Σ_j exp(x_j) w_j²`` on the training split, outer
    ``f(w) = ‖X_val w − y_val‖²/(2m)``. With ``A = XᵀX/n + diag(eˣ)`` the solution is
    ``w* = A⁻¹ Xᵀy/n`` and the hypergradient ``∇F(x) = −eˣ ⊙ w* ⊙ A⁻¹ ∇_w f(w*)``.
    """

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor

    @classmethod
    def make(
        cls,
        n_train: int = 100,
        n_val: int = 50,
        features: int = 10,
        noise: float = 0.1,
        spread: float = 1.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> RidgeRegression:
        """Gaussian design whose feature scales make ``XᵀX`` span about ``spread`` (its condition
        number when ``n_train ≫ features``), a random true ``w`` and Gaussian label noise."""
        gen = torch.Generator().manual_seed(seed)
        w_true = torch.randn(features, generator=gen, dtype=dtype)
        scales = torch.logspace(0, -0.5 * torch.log10(torch.tensor(spread)).item(), features, dtype=dtype)
        x = torch.randn(n_train + n_val, features, generator=gen, dtype=dtype) * scales
        y = x @ w_true + noise * torch.randn(n_train + n_val, generator=gen, dtype=dtype)
        return cls(x[:n_train], y[:n_train], x[n_train:], y[n_train:])

    def inner_loss(self, inner: Tree, outer: Tree, batch: object = None) -> Tensor:
        """``g``: training error plus the per-feature penalty."""
        w = inner["w"]
        fit = 0.5 * (self.x_train @ w - self.y_train).pow(2).mean()
        return fit + 0.5 * (outer["log_lambda"].exp() * w * w).sum()

    def outer_loss(self, inner: Tree, outer: Tree, batch: object = None) -> Tensor:
        """``f``: validation error."""
        return 0.5 * (self.x_val @ inner["w"] - self.y_val).pow(2).mean()

    @property
    def problem(self) -> BilevelProblem:
        """The :class:`BilevelProblem`."""
        return BilevelProblem(self.inner_loss, self.outer_loss)

    def outer_init(self, value: float = 0.0) -> Tree:
        """``log λ`` filled with ``value``."""
        return {"log_lambda": torch.full((self.x_train.shape[1],), value, dtype=self.x_train.dtype)}

    def inner_init(self) -> Tree:
        """``w = 0``."""
        return {"w": torch.zeros(self.x_train.shape[1], dtype=self.x_train.dtype)}

    def _system(self, outer: Tree) -> Tensor:
        n = self.x_train.shape[0]
        return self.x_train.T @ self.x_train / n + torch.diag(outer["log_lambda"].exp())

    def solution(self, outer: Tree) -> Tree:
        """``w*(x)`` in closed form."""
        n = self.x_train.shape[0]
        return {"w": torch.linalg.solve(self._system(outer), self.x_train.T @ self.y_train / n)}

    def hypergradient(self, outer: Tree) -> Tree:
        """``∇F(x)`` in closed form."""
        w = self.solution(outer)["w"]
        m = self.x_val.shape[0]
        grad_w = self.x_val.T @ (self.x_val @ w - self.y_val) / m
        return {"log_lambda": -outer["log_lambda"].exp() * w * torch.linalg.solve(self._system(outer), grad_w)}

    def lipschitz(self, outer: Tree) -> float:
        """The largest eigenvalue of ``∇²_ww g``, for a ``1/L`` step."""
        return float(torch.linalg.eigvalsh(self._system(outer)).max())
