"""Reference bilevel problems with closed-form answers, for tests, benchmarks and experiments."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel_dist.label_noise import flip_labels
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.tree import Tree


def _index(batch: object) -> slice | Tensor:
    """The sample ids of an ``{"index": ...}`` batch; ``None`` means every sample."""
    return slice(None) if batch is None else batch["index"]  # type: ignore[index]


class _Reference:
    """What every reference problem shares: its losses as a :class:`BilevelProblem`."""

    def inner_loss(self, inner: Tree, outer: Tree, batch: object = None) -> Tensor:
        raise NotImplementedError

    def outer_loss(self, inner: Tree, outer: Tree, batch: object = None) -> Tensor:
        raise NotImplementedError

    @property
    def problem(self) -> BilevelProblem:
        """The :class:`BilevelProblem`."""
        return BilevelProblem(self.inner_loss, self.outer_loss)


class _Sampled(_Reference):
    """A reference problem whose batches are ``{"index": sample ids}``."""

    n_inner: int
    n_outer: int

    def full_batches(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Batches holding every inner and every outer sample."""
        return {"index": torch.arange(self.n_inner)}, {"index": torch.arange(self.n_outer)}


@dataclass
class RidgeRegression(_Reference):
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


def _symmetric_noise(gen: torch.Generator, count: int, dim: int, scale: float, dtype: torch.dtype) -> Tensor:
    """``count`` symmetric matrices that sum to zero, so per-sample terms average to the mean."""
    noise = torch.randn(count, dim, dim, generator=gen, dtype=dtype) * scale / dim**0.5
    noise = 0.5 * (noise + noise.transpose(1, 2))
    return noise - noise.mean(0)


@dataclass
class FiniteSumQuadratic(_Sampled):
    """The finite-sum quadratic of benchopt's bilevel benchmark, with closed forms.

    ``g(x, z) = (1/n) Σ_i ½ zᵀA_i z + xᵀB_i z`` and ``f(x, z) = (1/m) Σ_j ½ zᵀC_j z + c_jᵀz + ½ μ_x‖x‖²``.
    With the means ``A, B, C, c``: ``z*(x) = −A⁻¹Bᵀx``, the value function ``h(x) = f(x, z*(x))``
    and ``∇h(x) = μ_x x − B A⁻¹ (C z* + c)``. ``A``'s spectrum spans ``[mu_inner, L_inner]``.
    Batches are ``{"index": sample ids}``; ``None`` means the full sum.
    """

    a: Tensor
    b: Tensor
    c: Tensor
    c_lin: Tensor
    mu_outer: float

    @classmethod
    def make(
        cls,
        dim_inner: int = 10,
        dim_outer: int = 10,
        n_inner: int = 64,
        n_outer: int = 64,
        mu_inner: float = 0.5,
        L_inner: float = 1.0,
        mu_outer: float = 1.0,
        noise: float = 0.1,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> FiniteSumQuadratic:
        """Random rotations of controlled spectra plus zero-mean per-sample perturbations."""
        gen = torch.Generator().manual_seed(seed)
        q = torch.linalg.qr(torch.randn(dim_inner, dim_inner, generator=gen, dtype=dtype))[0]
        a = q @ torch.diag(torch.linspace(mu_inner, L_inner, dim_inner, dtype=dtype)) @ q.T
        a = a + _symmetric_noise(gen, n_inner, dim_inner, noise, dtype)
        b = torch.randn(dim_outer, dim_inner, generator=gen, dtype=dtype) / dim_inner**0.5
        b = b + noise * (lambda e: e - e.mean(0))(
            torch.randn(n_inner, dim_outer, dim_inner, generator=gen, dtype=dtype)
        )
        r = torch.randn(dim_inner, dim_inner, generator=gen, dtype=dtype) / dim_inner**0.5
        c = (r @ r.T) + _symmetric_noise(gen, n_outer, dim_inner, noise, dtype)
        c_lin = torch.randn(n_outer, dim_inner, generator=gen, dtype=dtype)
        return cls(a, b, c, c_lin, mu_outer)

    def inner_loss(self, inner: Tree, outer: Tree, batch: object = None) -> Tensor:
        """``g`` on the batch."""
        z, x = inner["z"], outer["x"]
        a, b = self.a[_index(batch)], self.b[_index(batch)]
        return (0.5 * torch.einsum("i,nij,j->n", z, a, z) + torch.einsum("i,nij,j->n", x, b, z)).mean()

    def outer_loss(self, inner: Tree, outer: Tree, batch: object = None) -> Tensor:
        """``f`` on the batch."""
        z, x = inner["z"], outer["x"]
        c, lin = self.c[_index(batch)], self.c_lin[_index(batch)]
        return (0.5 * torch.einsum("i,nij,j->n", z, c, z) + lin @ z).mean() + 0.5 * self.mu_outer * (x * x).sum()

    @property
    def n_inner(self) -> int:
        """Number of inner samples."""
        return self.a.shape[0]

    @property
    def n_outer(self) -> int:
        """Number of outer samples."""
        return self.c.shape[0]

    def outer_init(self) -> Tree:
        """``x = 1``."""
        return {"x": torch.ones(self.b.shape[1], dtype=self.a.dtype)}

    def inner_init(self) -> Tree:
        """``z = 0``."""
        return {"z": torch.zeros(self.a.shape[1], dtype=self.a.dtype)}

    def solution(self, outer: Tree) -> Tree:
        """``z*(x)``."""
        return {"z": -torch.linalg.solve(self.a.mean(0), self.b.mean(0).T @ outer["x"])}

    def value(self, outer: Tree) -> float:
        """``h(x) = f(x, z*(x))``."""
        return float(self.outer_loss(self.solution(outer), outer))

    def hypergradient(self, outer: Tree) -> Tree:
        """``∇h(x)`` in closed form."""
        z = self.solution(outer)["z"]
        a, b = self.a.mean(0), self.b.mean(0)
        grad_z = self.c.mean(0) @ z + self.c_lin.mean(0)
        return {"x": self.mu_outer * outer["x"] - b @ torch.linalg.solve(a, grad_z)}


@dataclass
class HyperCleaning(_Sampled):
    """Data hyper-cleaning (Franceschi et al. 2017) on scikit-learn's bundled 8×8 digits.

    Inner: a linear softmax model ``{"weight", "bias"}`` trained on
    ``(1/n) Σ_i σ(a_i) CE_i + reg ‖W‖²`` over noisy training labels; outer: one logit ``a_i`` per
    training sample, judged by the cross-entropy on a small clean validation set. Batches are
    ``{"index": sample ids}`` into the training (inner) or validation (outer) split.
    """

    x_train: Tensor
    y_train: Tensor
    flipped: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    reg: float

    @classmethod
    def make(
        cls,
        noise: float = 0.5,
        n_val: int = 150,
        n_test: int = 500,
        reg: float = 1e-3,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> HyperCleaning:
        """Shuffles the 1,797 digits, splits test / validation / train and flips training labels."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(digits.target), generator=gen)
        x = torch.as_tensor(digits.data, dtype=dtype)[order] / 16.0
        y = torch.as_tensor(digits.target)[order]
        mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
        x = (x - mean) / std
        test, val, train = slice(0, n_test), slice(n_test, n_test + n_val), slice(n_test + n_val, None)
        noisy, flipped = flip_labels(y[train], noise, 10, gen)
        return cls(x[train], noisy, flipped, x[val], y[val], x[test], y[test], reg)

    @staticmethod
    def _logits(inner: Tree, x: Tensor) -> Tensor:
        return x @ inner["weight"] + inner["bias"]

    def inner_loss(self, inner: Tree, outer: Tree, batch: object = None) -> Tensor:
        """Weighted training cross-entropy plus ``reg ‖W‖²``."""
        index = _index(batch)
        losses = torch.nn.functional.cross_entropy(
            self._logits(inner, self.x_train[index]), self.y_train[index], reduction="none"
        )
        return (torch.sigmoid(outer["logit"][index]) * losses).mean() + self.reg * (inner["weight"] ** 2).sum()

    def outer_loss(self, inner: Tree, outer: Tree, batch: object = None) -> Tensor:
        """Clean validation cross-entropy."""
        index = _index(batch)
        return torch.nn.functional.cross_entropy(self._logits(inner, self.x_val[index]), self.y_val[index])

    @property
    def n_inner(self) -> int:
        """Number of training samples."""
        return self.x_train.shape[0]

    @property
    def n_outer(self) -> int:
        """Number of validation samples."""
        return self.x_val.shape[0]

    def outer_init(self) -> Tree:
        """Every sample weight at ``σ(0) = 0.5``."""
        return {"logit": torch.zeros(self.n_inner, dtype=self.x_train.dtype)}

    def inner_init(self) -> Tree:
        """A zero linear model."""
        dtype = self.x_train.dtype
        return {"weight": torch.zeros(self.x_train.shape[1], 10, dtype=dtype), "bias": torch.zeros(10, dtype=dtype)}

    def test_error(self, inner: Tree) -> float:
        """Misclassification rate on the clean test split."""
        return float((self._logits(inner, self.x_test).argmax(1) != self.y_test).double().mean())

    def fit(self, outer: Tree, steps: int = 2000, lr: float = 1.0) -> Tree:
        """Trains the inner model to convergence for fixed sample weights (full-batch GD)."""
        from bilevel_dist.solvers import GD, run

        return run(GD(lr, steps, tol=1e-6), self.problem, self.inner_init(), outer, None).inner

    def unweighted_error(self) -> float:
        """Test error of the model trained on the corrupted data without weights (all equal)."""
        return self.test_error(self.fit(self.outer_init()))


@dataclass
class LogisticRegression(_Sampled):
    """Binary logistic regression with one regularisation weight per feature (benchopt's ijcnn1
    problem on synthetic data): inner ``mean CE + ½ Σ_j exp(x_j) w_j²`` on the training split,
    outer the unregularised validation cross-entropy. Batches are ``{"index": sample ids}``."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor

    @classmethod
    def make(
        cls, n_train: int = 200, n_val: int = 100, features: int = 10, seed: int = 0, dtype: torch.dtype = torch.float64
    ) -> LogisticRegression:
        """Gaussian features, labels drawn from a random logistic teacher."""
        gen = torch.Generator().manual_seed(seed)
        w_true = torch.randn(features, generator=gen, dtype=dtype)
        x = torch.randn(n_train + n_val, features, generator=gen, dtype=dtype)
        y = (torch.sigmoid(x @ w_true) > torch.rand(n_train + n_val, generator=gen, dtype=dtype)).to(dtype)
        return cls(x[:n_train], y[:n_train], x[n_train:], y[n_train:])

    def inner_loss(self, inner: Tree, outer: Tree, batch: object = None) -> Tensor:
        """Training cross-entropy plus the per-feature penalty."""
        index = _index(batch)
        fit = torch.nn.functional.binary_cross_entropy_with_logits(
            self.x_train[index] @ inner["w"], self.y_train[index]
        )
        return fit + 0.5 * (outer["log_lambda"].exp() * inner["w"] ** 2).sum()

    def outer_loss(self, inner: Tree, outer: Tree, batch: object = None) -> Tensor:
        """Validation cross-entropy."""
        index = _index(batch)
        return torch.nn.functional.binary_cross_entropy_with_logits(self.x_val[index] @ inner["w"], self.y_val[index])

    @property
    def n_inner(self) -> int:
        """Number of training samples."""
        return self.x_train.shape[0]

    @property
    def n_outer(self) -> int:
        """Number of validation samples."""
        return self.x_val.shape[0]

    def outer_init(self, value: float = -3.0) -> Tree:
        """``log λ`` filled with ``value``."""
        return {"log_lambda": torch.full((self.x_train.shape[1],), value, dtype=self.x_train.dtype)}

    def inner_init(self) -> Tree:
        """``w = 0``."""
        return {"w": torch.zeros(self.x_train.shape[1], dtype=self.x_train.dtype)}

    def solution(self, outer: Tree, iters: int = 30) -> Tree:
        """``w*(x)`` by Newton's method (strongly convex inner problem), a reference solver."""
        w = self.inner_init()["w"]
        penalty = outer["log_lambda"].exp()
        for _ in range(iters):
            p = torch.sigmoid(self.x_train @ w)
            n = self.x_train.shape[0]
            grad = self.x_train.T @ (p - self.y_train) / n + penalty * w
            hess = (self.x_train.T * (p * (1 - p))) @ self.x_train / n + torch.diag(penalty)
            w = w - torch.linalg.solve(hess, grad)
        return {"w": w}

    def value(self, outer: Tree) -> float:
        """``h(x) = f(x, w*(x))`` through the Newton reference solution."""
        return float(self.outer_loss(self.solution(outer), outer))


@dataclass
class TaskHeads(_Reference):
    """Independent per-task ridge heads around a shared centre (iMAML-like), a batched problem.

    Task ``t`` has ``g_t(w_t, x) = ‖A_t w_t − b_t‖²/2n + λ/2 ‖w_t − x‖²`` and
    ``f_t(w_t) = ‖C_t w_t − e_t‖²/2n``; ``inner_loss``/``outer_loss`` are the sums over the tasks of
    a batch ``{"index": task ids}``, whose heads are the rows of ``w`` in that order (the batched
    convention, :mod:`bilevel_dist.oracles`). With ``M_t = A_tᵀA_t/n + λI``:
    ``w_t* = M_t⁻¹ (A_tᵀb_t/n + λx)`` and ``∇F(x) = Σ_t λ M_t⁻¹ C_tᵀ(C_t w_t* − e_t)/n``.
    """

    a: Tensor
    b: Tensor
    c: Tensor
    e: Tensor
    lam: float

    @classmethod
    def make(
        cls, tasks: int = 64, dim: int = 5, samples: int = 8, lam: float = 0.5, seed: int = 0, dtype=torch.float64
    ) -> TaskHeads:
        """Gaussian task data; spectra of the ``M_t`` differ, so per-problem solves differ."""
        gen = torch.Generator().manual_seed(seed)
        scale = torch.linspace(0.3, 1.0, tasks, dtype=dtype)[:, None, None]
        a = torch.randn(tasks, samples, dim, generator=gen, dtype=dtype) * scale
        c = torch.randn(tasks, samples, dim, generator=gen, dtype=dtype)
        b, e = (torch.randn(tasks, samples, generator=gen, dtype=dtype) for _ in range(2))
        return cls(a, b, c, e, lam)

    @property
    def problem(self) -> BilevelProblem:
        """The batched :class:`BilevelProblem`."""
        return BilevelProblem(self.inner_loss, self.outer_loss, batched=True)

    def _ids(self, batch: object) -> slice | Tensor:
        return _index(batch)

    def inner_loss(self, inner: Tree, outer: Tree, batch: object = None) -> Tensor:
        t, heads = self._ids(batch), inner["w"]
        fit = torch.einsum("tnd,td->tn", self.a[t], heads) - self.b[t]
        n = self.a.shape[1]
        return (fit.pow(2).sum(1) / (2 * n) + 0.5 * self.lam * (heads - outer["x"]).pow(2).sum(1)).sum()

    def outer_loss(self, inner: Tree, outer: Tree, batch: object = None) -> Tensor:
        t, heads = self._ids(batch), inner["w"]
        fit = torch.einsum("tnd,td->tn", self.c[t], heads) - self.e[t]
        return (fit.pow(2).sum(1) / (2 * self.a.shape[1])).sum()

    @property
    def tasks(self) -> int:
        """Number of tasks."""
        return self.a.shape[0]

    def outer_init(self) -> Tree:
        """``x = 0``."""
        return {"x": torch.zeros(self.a.shape[2], dtype=self.a.dtype)}

    def inner_init(self, tasks: int | None = None) -> Tree:
        """Every head at 0."""
        return {"w": torch.zeros(tasks or self.tasks, self.a.shape[2], dtype=self.a.dtype)}

    def _systems(self) -> Tensor:
        n, dim = self.a.shape[1], self.a.shape[2]
        eye = torch.eye(dim, dtype=self.a.dtype)
        return self.a.transpose(1, 2) @ self.a / n + self.lam * eye

    def solution(self, outer: Tree) -> Tree:
        """Every ``w_t*(x)`` in closed form."""
        n = self.a.shape[1]
        rhs = torch.einsum("tnd,tn->td", self.a, self.b) / n + self.lam * outer["x"]
        return {"w": torch.linalg.solve(self._systems(), rhs)}

    def hypergradient(self, outer: Tree) -> Tree:
        """``∇F(x)`` in closed form."""
        w = self.solution(outer)["w"]
        n = self.a.shape[1]
        grad_w = torch.einsum("tnd,tn->td", self.c, torch.einsum("tnd,td->tn", self.c, w) - self.e) / n
        return {"x": self.lam * torch.linalg.solve(self._systems(), grad_w).sum(0)}
