"""The learned lower-level cost of Crockett & Fessler's running example (Ex):

    Φ(x; c, β, y) = ½‖Ax − y‖² + e^{β₀} Σ_k e^{β_k} Σ_j φ((c_k ⊛ x)_j; ε),

with ``φ(z) = √(z² + ε²) − ε`` the corner-rounded 1-norm (CR1N, shifted so ``φ(0) = 0``) and
``⊛`` circular cross-correlation (the review's convention, PyTorch's ``conv2d``). Filters
start as the non-constant DCT atoms; two finite-difference filters give (smoothed, anisotropic)
total variation, the TV baseline.

The regulariser ``R = Σ_k w_k Σ_j φ(c_k ⊛ x)`` (``w = e^{β₀ + β}``) has analytic derivatives:
with ``z = Cx``, ``φ'(z) = z/√(z² + ε²)`` and ``φ''(z) = ε²/(z² + ε²)^{3/2}``,

    ∇_x R = Cᵀ(w ⊙ φ'(z)),    ∇²_xx R · v = Cᵀ(w ⊙ φ''(z) ⊙ Cv),

and the mixed products in the filters and the weights. Autograd sees each as one node (a
Hessian-vector product is a correlation, a product and an adjoint correlation, not a double
backward through every element-wise op of the energy), and the products in ``x`` and in ``(c, w)``
are separate nodes, so that a run of Hessian-vector products never computes a mixed one.
Inside ``torch.func`` transforms or forward-mode AD, and wherever a derivative must itself be
differentiated further, the composite formula (:func:`correlate`, :func:`cr1n`) gives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function, forward_ad

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


def _composite(x: Tensor, filters: Tensor, weights: Tensor, eps: float) -> Tensor:
    """``R`` per image from differentiable primitives (any order, any transform)."""
    return (cr1n(correlate(x, filters), eps).flatten(2).sum(2) * weights).sum(1)


# --------------------------------------------------------------------------- the kernels
# The im2col form below against conv2d / conv_transpose2d with circular padding (3×3 filters,
# 16 to 256 images of 32×32, float32, one CPU thread): the correlation about 2× faster, the
# adjoint about 5×; on one image about as fast (fewer ops).

#: images from which a block holds them pixel-major, ``(H·W, B)``: the taps' gather and the
#: adjoint's scatter move rows of ``B`` numbers; fewer images are held image-major, ``(B, H·W)``.
PIXEL_MAJOR = 8
#: pixel-major blocks of fewer values than this (``B·H·W``) gather the adjoint's terms and sum
#: them: a scatter-add costs per row, and rows are short.
GATHER_ADJOINT = 32768
#: values per block (``B·H·W``; 64 images of 32×32): larger batches run block by block, so that
#: each block's arrays stay near the cache.
BLOCK = 65536

_TAPS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _tap_index(h: int, w: int, sh: int, sw: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For every filter tap ``(s, t)`` and pixel ``(i, j)`` (in that order, flattened), the pixel
    that the tap meets, ``((i + s − (sh−1)//2) mod h, (j + t − (sw−1)//2) mod w)`` flattened
    (:func:`correlate`'s periodic boundaries); and its inverse: for every tap and pixel, where in
    the first that pixel is met by that tap."""
    key = (h, w, sh, sw, device)
    if key not in _TAPS:
        rows = (torch.arange(sh, device=device)[:, None] + torch.arange(h, device=device) - (sh - 1) // 2) % h
        cols = (torch.arange(sw, device=device)[:, None] + torch.arange(w, device=device) - (sw - 1) // 2) % w
        index = (rows[:, None, :, None] * w + cols[None, :, None, :]).reshape(sh * sw, h * w)
        inverse = index.argsort(1) + torch.arange(0, index.numel(), h * w, device=device)[:, None]
        _TAPS[key] = index.reshape(-1), inverse.reshape(-1)
    return _TAPS[key]


class _Correlation:
    """``Cx``, ``Cᵀm`` and ``∂/∂c`` for one filter bank and block of images, without autograd.
    The taps are one gather and the filters one matrix product (im2col); the adjoint is one
    matrix product and one scatter-add (or gather and sum). In this block's layout images are
    ``(H·W, B)`` pixel-major or ``(B, H·W)`` image-major and ``Cx`` is ``(K, H·W, B)`` or
    ``(B, K, H·W)``; per (filter, image) numbers are ``(K, B)`` in both."""

    def __init__(self, filters: Tensor, shape: torch.Size) -> None:
        self.k, (sh, sw) = filters.shape[0], filters.shape[-2:]
        self.b, _, self.h, self.w = shape
        self.n = self.h * self.w
        self.matrix = filters.reshape(self.k, sh * sw)
        self.index, self.inverse = _tap_index(self.h, self.w, sh, sw, filters.device)
        self.pixel_major = self.b >= PIXEL_MAJOR
        self.gather = self.pixel_major and self.b * self.n < GATHER_ADJOINT

    def pixels(self, x: Tensor) -> Tensor:
        """Images ``(B, 1, H, W)`` in this layout."""
        flat = x.reshape(self.b, self.n)
        return flat.T.contiguous() if self.pixel_major else flat

    def image(self, a: Tensor) -> Tensor:
        """This layout's images as ``(B, 1, H, W)``."""
        return (a.T if self.pixel_major else a).reshape(self.b, 1, self.h, self.w).contiguous()

    def taps(self, a: Tensor) -> Tensor:
        """The pixels that every tap meets: ``(S, H·W·B)`` pixel-major, ``(B, S, H·W)`` image-major."""
        if self.pixel_major:
            return a.index_select(0, self.index).view(self.matrix.shape[1], -1)
        return a.index_select(1, self.index).view(self.b, -1, self.n)

    def __call__(self, a: Tensor) -> Tensor:
        """``Cx`` of images in this layout."""
        z = self.matrix @ self.taps(a)
        return z.view(self.k, self.n, self.b) if self.pixel_major else z

    def adjoint(self, m: Tensor, weights: Tensor | None = None) -> Tensor:
        """``Cᵀ(w ⊙ m)`` (``w`` per filter, default 1) in this layout."""
        matrix = self.matrix if weights is None else self.matrix * weights[:, None]
        if not self.pixel_major:
            parts = (matrix.T @ m).view(self.b, -1)
            return m.new_zeros(self.b, self.n).index_add_(1, self.index, parts)
        parts = (matrix.T @ m.reshape(self.k, -1)).view(-1, self.b)
        if self.gather:
            return parts.index_select(0, self.inverse).view(-1, self.n, self.b).sum(0)
        return m.new_zeros(self.n, self.b).index_add_(0, self.index, parts)

    def per_image(self, g: Tensor) -> Tensor:
        """``(B,)`` shaped to scale images in this layout."""
        return g if self.pixel_major else g[:, None]

    def per_pair(self, kb: Tensor) -> Tensor:
        """``(K, B)`` shaped to scale ``Cx``."""
        return kb[:, None, :] if self.pixel_major else kb.T[:, :, None]

    def pixel_sums(self, m: Tensor) -> Tensor:
        """``Σ_j m`` per (filter, image): ``(K, B)``."""
        return m.sum(1) if self.pixel_major else m.sum(2).T

    def filter_grad(self, m: Tensor, taps: Tensor) -> Tensor:
        """``∂/∂c ⟨m, Cu⟩`` given ``u``'s :meth:`taps`, ``(K, S)`` in float64: a sum over every
        pixel of every image, summed in float64 over blocks of ``H·W`` terms (in float32 the
        sum over many images would be off by about 1e-6)."""
        if self.pixel_major:  # B blocks of H·W columns, as strided views
            m = m.reshape(self.k, self.b, self.n).transpose(0, 1)
            taps = taps.view(-1, self.b, self.n).permute(1, 2, 0)
        else:
            taps = taps.transpose(1, 2)
        return torch.bmm(m, taps).sum(0, dtype=torch.float64)


class _Block:
    """The regulariser on a block of images: ``z = Cx``, ``s = √(z² + ε²)``, the values, and the
    first derivatives from them; parameter derivatives in float64."""

    def __init__(self, x: Tensor, filters: Tensor, w: Tensor, eps: float) -> None:
        self.op = op = _Correlation(filters, x.shape)
        self.w, self.eps = w, eps
        self.images = op.pixels(x)
        self.z = op(self.images)
        self.s = torch.addcmul(self.z.new_full((), eps * eps), self.z, self.z).sqrt_()
        self.sums = op.pixel_sums(self.s).sub_(eps * op.n)  # Σ_j φ per (filter, image)
        self.value = w @ self.sums
        self._slope: Tensor | None = None

    @property
    def slope(self) -> Tensor:
        """``φ'(z) = z/s``."""
        if self._slope is None:
            self._slope = self.z / self.s
        return self._slope

    def grad_x(self, g: Tensor) -> Tensor:
        """``∇_x ⟨g, R⟩ = g ⊙ Cᵀ(w ⊙ φ'(z))``."""
        op = self.op
        return op.image(op.adjoint(self.slope, self.w).mul_(op.per_image(g)))

    def grad_params(self, g: Tensor, need: tuple[bool, ...]) -> tuple[Tensor | None, Tensor | None]:
        """``(∂/∂c, ∂/∂w)`` of ``⟨g, R⟩``."""
        op = self.op
        filters = weights = None
        if need[0]:
            filters = op.filter_grad(self.slope * op.per_pair(torch.outer(self.w, g)), op.taps(self.images))
        if need[1]:
            weights = self.sums.double() @ g.double()
        return filters, weights


class _BlockLinear:
    """``∇_x ⟨g, R⟩`` on a :class:`_Block` and its products with a direction ``v``."""

    def __init__(self, block: _Block, g: Tensor) -> None:
        self.block, self.g = block, g
        self.scale = block.op.per_pair(torch.outer(block.w, g))  # w_k g_b
        self._curvature: Tensor | None = None

    @property
    def curvature(self) -> Tensor:
        """``w g φ''(z) = w g ε²/s³``."""
        if self._curvature is None:
            s, eps = self.block.s, self.block.eps
            self._curvature = (s * s).mul_(s).reciprocal_().mul_(self.scale * (eps * eps))
        return self._curvature

    def hvp(self, v: Tensor) -> Tensor:
        """``∇²_xx ⟨g, R⟩ · v = Cᵀ(w g φ''(z) ⊙ Cv)``."""
        op = self.block.op
        return op.image(op.adjoint(op(op.pixels(v)).mul_(self.curvature)))

    def mixed(self, v: Tensor, need: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
        """``∂/∂(c, w, g) ⟨v, ∇_x ⟨g, R⟩⟩``: with ``q = Cv``, ``∂/∂c`` meets ``v`` through ``Cᵀ``
        and ``x`` through ``φ'(z)``; ``w`` and ``g`` scale ``⟨q, φ'(z)⟩``."""
        block, op = self.block, self.block.op
        images = op.pixels(v)
        q = op(images)
        filters = weights = g = None
        if need[0]:
            filters = op.filter_grad(block.slope * self.scale, op.taps(images))
            filters += op.filter_grad(q * self.curvature, op.taps(block.images))
        if need[1] or need[2]:
            along = op.pixel_sums(q * block.slope)  # ⟨Cv, φ'(z)⟩ per (filter, image)
            weights = along.double() @ self.g.double() if need[1] else None
            g = block.w @ along if need[2] else None
        return filters, weights, g


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _sum(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else sum(parts[1:], parts[0])  # type: ignore[arg-type]


class _Point:
    """The regulariser at one ``(x, c, w)``, block by block (:data:`BLOCK`), with its
    derivatives. ``x``, ``filters`` and ``weights`` are the caller's tensors (a composite
    fallback differentiates through them); everything computed is detached."""

    def __init__(self, x: Tensor, filters: Tensor, weights: Tensor, eps: float) -> None:
        self.x, self.filters, self.weights, self.eps = x, filters, weights, eps
        self.per_block = max(1, BLOCK // (x.shape[-2] * x.shape[-1]))
        with torch.no_grad():
            detached, w = filters.detach(), weights.detach()
            self.blocks = [_Block(part, detached, w, eps) for part in x.detach().split(self.per_block)]
            self.value = _cat([block.value for block in self.blocks])

    def cotangent(self, g: Tensor) -> list[Tensor]:
        """``g``, the cotangent of the per-image values, split into blocks."""
        return list(g.detach().to(self.weights.dtype).expand(self.x.shape[0]).split(self.per_block))

    def params(self, filters: Tensor | None, weights: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Float64 derivatives in ``(c, w)`` in the parameters' shapes and dtypes."""
        return (
            None if filters is None else filters.view(self.filters.shape).to(self.filters.dtype),
            None if weights is None else weights.to(self.weights.dtype),
        )

    def grad_x(self, g: Tensor) -> Tensor:
        with torch.no_grad():
            return _cat([block.grad_x(part) for block, part in zip(self.blocks, self.cotangent(g), strict=True)])

    def grad_params(self, g: Tensor, need: tuple[bool, ...]) -> tuple[Tensor | None, Tensor | None]:
        with torch.no_grad():
            parts = [block.grad_params(p, need) for block, p in zip(self.blocks, self.cotangent(g), strict=True)]
            return self.params(*(_sum(list(each)) for each in zip(*parts, strict=True)))

    def linearise(self, g: Tensor) -> _Linear:
        return _Linear(self, g)


class _Linear:
    """``∇_x ⟨g, R⟩`` at a :class:`_Point` and its products with a direction ``v`` (``(B, 1, H, W)``)."""

    def __init__(self, point: _Point, g: Tensor) -> None:
        self.point = point
        self.blocks = [_BlockLinear(block, p) for block, p in zip(point.blocks, point.cotangent(g), strict=True)]

    def grad(self) -> Tensor:
        """``∇_x ⟨g, R⟩`` (kept nowhere: it becomes a node's output)."""
        with torch.no_grad():
            return _cat([lin.block.grad_x(lin.g) for lin in self.blocks])

    def hvp(self, v: Tensor) -> Tensor:
        with torch.no_grad():
            return _cat([lin.hvp(part) for lin, part in zip(self.blocks, v.split(self.point.per_block), strict=True)])

    def mixed(self, v: Tensor, need: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
        with torch.no_grad():
            parts = [lin.mixed(p, need) for lin, p in zip(self.blocks, v.split(self.point.per_block), strict=True)]
            filters, weights, g = zip(*parts, strict=True)
            return (*self.point.params(_sum(list(filters)), _sum(list(weights))), None if g[0] is None else _cat(g))


# --------------------------------------------------------------------------- autograd nodes
# R = ValueX(x) + ValueParams(c, w), the second zero-valued with the derivatives in (c, w) as its
# backward; a backward with create_graph gives ∇_x R = GradX(x) + GradParams(c, w, g) alike, so
# that products in x never run the node of the products in (c, w), nor the reverse.


def _differentiable(outputs: Tensor, inputs: tuple[Tensor, ...], cotangent: Tensor) -> tuple[Tensor | None, ...]:
    """``∂/∂inputs ⟨cotangent, outputs⟩`` with a graph (``None`` where an input needs no grad)."""
    wanted = [t for t in inputs if t.requires_grad]
    found = iter(torch.autograd.grad(outputs, wanted, cotangent, create_graph=True, allow_unused=True))
    return tuple(next(found) if t.requires_grad else None for t in inputs)


def _composite_grad_x(point: _Point, x: Tensor, g: Tensor) -> Tensor:
    """``∇_x ⟨g, R⟩`` with a graph, from the composite formula."""
    value = _composite(x, point.filters, point.weights, point.eps)
    return torch.autograd.grad(value, x, g, create_graph=True)[0]


class _ValueX(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, point: _Point) -> Tensor:
        ctx.point = point
        ctx.save_for_backward(x)
        return point.value.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        point: _Point = ctx.point
        if not torch.is_grad_enabled():
            return point.grad_x(g), None
        (x,) = ctx.saved_tensors
        lin = point.linearise(g)
        grad = _GradX.apply(x, g, lin)
        if point.filters.requires_grad or point.weights.requires_grad or g.requires_grad:
            grad = grad + _GradParams.apply(point.filters, point.weights, g, lin)
        return grad, None


class _ValueParams(Function):
    @staticmethod
    def forward(ctx: Any, filters: Tensor, weights: Tensor, point: _Point) -> Tensor:
        ctx.point = point
        return torch.zeros_like(point.value)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        point: _Point = ctx.point
        if not torch.is_grad_enabled():
            return (*point.grad_params(g, ctx.needs_input_grad[:2]), None)
        value = _composite(point.x, point.filters, point.weights, point.eps)
        return (*_differentiable(value, (point.filters, point.weights), g), None)


class _GradX(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, g: Tensor, lin: _Linear) -> Tensor:
        ctx.lin = lin
        ctx.save_for_backward(x, g)
        return lin.grad()

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, None, None]:
        lin: _Linear = ctx.lin
        if not torch.is_grad_enabled():
            return lin.hvp(v), None, None
        x, g = ctx.saved_tensors
        return (*_differentiable(_composite_grad_x(lin.point, x, g), (x,), v), None, None)


class _GradParams(Function):
    @staticmethod
    def forward(ctx: Any, filters: Tensor, weights: Tensor, g: Tensor, lin: _Linear) -> Tensor:
        ctx.lin = lin
        ctx.save_for_backward(g)
        return torch.zeros_like(lin.point.x)

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        lin: _Linear = ctx.lin
        if not torch.is_grad_enabled():
            return (*lin.mixed(v, ctx.needs_input_grad[:3]), None)
        p, (g,) = lin.point, ctx.saved_tensors
        x = p.x if p.x.requires_grad else p.x.detach().requires_grad_()
        return (*_differentiable(_composite_grad_x(p, x, g), (p.filters, p.weights, g), v), None)


def _transformed() -> bool:
    """Inside ``torch.func`` transforms or forward-mode AD (the nodes above are reverse-mode only)."""
    return torch._C._functorch.peek_interpreter_stack() is not None or getattr(forward_ad, "_current_level", -1) >= 0


def _regulariser(x: Tensor, filters: Tensor, weights: Tensor, eps: float) -> Tensor:
    """``R = Σ_k w_k Σ_j φ(c_k ⊛ x)`` per image (``weights``: ``(K,)``, ``x``'s dtype), its
    derivatives by the nodes above."""
    if _transformed():
        return _composite(x, filters, weights, eps)
    point = _Point(x, filters, weights, eps)
    if not torch.is_grad_enabled():
        return point.value
    value = _ValueX.apply(x, point) if x.requires_grad else point.value
    if filters.requires_grad or weights.requires_grad:
        value = value + _ValueParams.apply(filters, weights, point)
    return value


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
        return _regulariser(x, filters, weights.to(x.dtype), self.eps)

    def __call__(self, x: Tensor, y: Tensor, filters: Tensor, beta: Tensor) -> Tensor:
        """``Φ`` of each image of ``x`` (``(B, 1, H, W)``) given its measurement ``y``."""
        return self.data_term(x, y) + self.regulariser(x, filters, beta)

    def lipschitz(self, filters: Tensor, beta: Tensor, shape: tuple[int, int]) -> float:
        """Eq. (4.19): ``L = σ₁(A)² + e^{β₀} (1/ε) Σ_k e^{β_k} ‖c_k‖₁²`` bounds ``‖∇²_xx Φ‖``."""
        like = filters.detach()
        l1 = like.abs().flatten(1).sum(1)
        bound = math.exp(self.beta0) / self.eps * float((torch.exp(beta.detach()) * l1 * l1).sum())
        return self.operator.norm_squared(shape, like) + bound

    def minimise(
        self, y: Tensor, filters: Tensor, beta: Tensor, steps: int, tol: float, x0: Tensor | None = None
    ) -> Tensor:
        """``x̂ = argmin_x Φ(x; c, β, y)`` of every image of ``y`` at once: OGM with gradient
        restart (:class:`~bilevel_dist.solvers.OGM`, per image), step ``1/L`` from (4.19), from
        ``x0`` (default ``Aᴴy``) until each image's ``‖∇_x Φ‖ ≤ tol`` or ``steps`` steps."""
        from bilevel_dist.problem import BilevelProblem
        from bilevel_dist.solvers import OGM, run

        with torch.inference_mode(False), torch.enable_grad():  # callers may evaluate without grad
            filters, beta = filters.detach(), beta.detach()

            def loss(inner: dict, params: dict, batch: Any) -> Tensor:
                return self(inner["x"], y, filters, params["beta"]).sum()

            problem = BilevelProblem(loss, loss, batched=True)
            start = self.operator.adjoint(y).to(filters.dtype) if x0 is None else x0
            bound = self.lipschitz(filters, beta, tuple(y.shape[-2:]))
            end = run(
                OGM(1 / bound, steps, tol, batched=True), problem, {"x": start.detach().clone()}, {"beta": beta}, None
            )
        return end.inner["x"].detach()


__all__ = ["FilterEnergy", "correlate", "cr1n", "dct_filters", "tv_filters"]
