"""The framework's tax: each algorithm's ``step`` against a hand-written torch loop doing the same
arithmetic, interleaved in one process, results checked equal.

    python benchmarks/overhead.py            # about 2 minutes; writes results/overhead.md

Hyper-cleaning on digits (``HyperCleaning.make()``: linear softmax model, one weight per training
sample, float64), inner batches of 256 samples cycled from a fixed list, the 150 validation samples
as the outer batch:

- ``aid``: 20 inner GD steps, CG with 10 iterations, an outer SGD step;
- ``itd``: 20 inner GD steps, reverse-mode through them;
- ``soba``: one step on ``w``, ``v`` and ``x``;
- ``penalty``: one ``w``-step and one ``x``-step on ``f + γ/2 ‖∇_w g‖²``;
- ``cg``: the implicit estimator alone, ``hypergrad.get("cg", iters=20)`` through ``solve`` on
  ridge regression (n = 2000, d = 200, one weight decay per feature) at the exact ``w*``;
- ``maml``: the few-shot recipe's MAML meta-step on 32 sinusoid tasks (``benchmarks/fewshot.py``'s
  workload, float32) against its fastest hand-written form (``vmap`` + ``autograd.grad``);
- ``maml, displaced``: the same against a hand-written loop in the recipe's own form (each task
  adapts a displacement from the meta-parameters).

Each hand-written loop uses autograd double backward on plain tensors, the fastest plain form
here. Timing: one torch thread, the two variants alternate in blocks of steps, a cell is the
fastest block (the shared CPUs swing; the minimum is what the code costs). Equality: both run the
same steps from the same start and their outer variables are compared.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bilevel_dist as bd  # noqa: E402
from bilevel_dist import algorithms  # noqa: E402
from bilevel_dist.problems import HyperCleaning, RidgeRegression  # noqa: E402

RESULTS = Path(__file__).parent / "results"
INNER_BATCH, BATCHES, CG_ITERS = 256, 8, 20
AID = {"inner_steps": 20, "linear_iters": 10, "inner_lr": 0.5, "outer_lr": 50.0}
ITD = {"inner_steps": 20, "inner_lr": 0.5, "outer_lr": 50.0}
SOBA = {"inner_lr": 0.5, "outer_lr": 50.0}
PENALTY = {"inner_lr": 0.5, "outer_lr": 50.0, "gamma": 1.0, "epsilon": 1.0}


class Cleaning:
    """The problem's tensors and its two losses on plain tensors, as a hand-written loop has them."""

    def __init__(self) -> None:
        self.data = HyperCleaning.make(noise=0.5, seed=0)
        gen = torch.Generator().manual_seed(0)
        n = self.data.n_inner
        self.inner_batches = [{"index": torch.randint(n, (INNER_BATCH,), generator=gen)} for _ in range(BATCHES)]
        self.outer_batch = {"index": torch.arange(self.data.n_outer)}

    def start(self) -> tuple[dict, dict]:
        d = self.data
        features, classes = d.x_train.shape[1], 10
        outer = {"logit": torch.zeros(d.n_inner, dtype=torch.float64)}
        f64 = torch.float64
        inner = {"weight": torch.zeros(features, classes, dtype=f64), "bias": torch.zeros(classes, dtype=f64)}
        return outer, inner

    def g(self, weight, bias, logit, k):
        """The problem's own inner loss: the same arithmetic as the framework evaluates."""
        return self.data.inner_loss({"weight": weight, "bias": bias}, {"logit": logit}, self.inner_batches[k])

    def f(self, weight, bias):
        return self.data.outer_loss({"weight": weight, "bias": bias}, {}, self.outer_batch)


class Framework:
    """``algorithms.get(name).step`` on the problem."""

    def __init__(self, name: str, hparams: dict, cleaning: Cleaning) -> None:
        self.cleaning = cleaning
        self.algorithm = algorithms.get(name, problem=cleaning.data.problem, **hparams)
        self.state = self.algorithm.init(*cleaning.start())
        self.k = 0

    def step(self) -> None:
        c = self.cleaning
        self.state, _ = self.algorithm.step(self.state, c.inner_batches[self.k % BATCHES], c.outer_batch)
        self.k += 1

    def outer(self) -> torch.Tensor:
        return self.state["outer"]["logit"]


class Hand:
    """Plain tensors ``w = (weight, bias)`` and ``x = logit``, steps written out."""

    def __init__(self, hparams: dict, cleaning: Cleaning) -> None:
        self.c, self.h = cleaning, hparams
        outer, inner = cleaning.start()
        self.x, self.w = outer["logit"], [inner["weight"], inner["bias"]]
        self.k = 0

    def outer(self) -> torch.Tensor:
        return self.x

    def step(self) -> None:
        self.advance(self.k % BATCHES)
        self.k += 1

    def inner_grad(self, w, x, k, create_graph=False):
        w = [p if p.requires_grad else p.detach().requires_grad_() for p in w]
        return w, torch.autograd.grad(self.c.g(*w, x, k), w, create_graph=create_graph)


class HandAID(Hand):
    def advance(self, k: int) -> None:
        lr = self.h["inner_lr"]
        w = self.w
        for _ in range(self.h["inner_steps"]):
            w, grads = self.inner_grad(w, self.x, k)
            w = [p.detach() - lr * g for p, g in zip(w, grads, strict=True)]
        self.w = w
        w = [p.requires_grad_() for p in w]
        x = self.x.detach().requires_grad_()
        gw = torch.autograd.grad(self.c.g(*w, x, k), w, create_graph=True)
        fw = torch.autograd.grad(self.c.f(*w), w)

        def hvp(v):
            return torch.autograd.grad(gw, w, v, retain_graph=True)

        # CG on H v = ∇_w f from 0, the framework's arithmetic
        v = [torch.zeros_like(b) for b in fw]
        r = list(fw)
        p = list(r)
        rr = sum((a * a).sum() for a in r)
        for _ in range(self.h["linear_iters"]):
            ap = hvp(p)
            alpha = rr / sum((a * b).sum() for a, b in zip(p, ap, strict=True))
            v = [vi + alpha * pi for vi, pi in zip(v, p, strict=True)]
            r = [ri - alpha * ai for ri, ai in zip(r, ap, strict=True)]
            rr_new = sum((a * a).sum() for a in r)
            p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p, strict=True)]
            rr = rr_new
        (jv,) = torch.autograd.grad(gw, x, v)
        # ∇_x f = 0: the validation loss does not see the weights
        self.x = self.x - self.h["outer_lr"] * (-jv)
        self.w = [p.detach() for p in self.w]


class HandITD(Hand):
    def advance(self, k: int) -> None:
        lr = self.h["inner_lr"]
        x = self.x.detach().requires_grad_()
        w = [p.detach().requires_grad_() for p in self.w]
        for _ in range(self.h["inner_steps"]):
            grads = torch.autograd.grad(self.c.g(*w, x, k), w, create_graph=True)
            w = [p - lr * g for p, g in zip(w, grads, strict=True)]
        (dx,) = torch.autograd.grad(self.c.f(*w), x)
        self.x = self.x - self.h["outer_lr"] * dx
        self.w = [p.detach() for p in w]


class HandSOBA(Hand):
    def __init__(self, hparams: dict, cleaning: Cleaning) -> None:
        super().__init__(hparams, cleaning)
        self.v = [torch.zeros_like(p) for p in self.w]

    def advance(self, k: int) -> None:
        w = [p.detach().requires_grad_() for p in self.w]
        x = self.x.detach().requires_grad_()
        gw = torch.autograd.grad(self.c.g(*w, x, k), w, create_graph=True)
        *hv, jv = torch.autograd.grad(gw, [*w, x], self.v)
        fw = torch.autograd.grad(self.c.f(*w), w)
        rho, gamma = self.h["inner_lr"], self.h["outer_lr"]
        self.w = [p.detach() - rho * g for p, g in zip(w, gw, strict=True)]
        self.v = [v - rho * (h - f) for v, h, f in zip(self.v, hv, fw, strict=True)]
        self.x = self.x - gamma * (-jv)


class HandPenalty(Hand):
    """One w-step and one x-step on ``f + γ/2‖∇_w g‖²`` (SGD, no multiplier, λ = 0), with the
    schedule's test on ``‖∇_w f̃‖² + ‖∇_x f̃‖² ≤ ε²``."""

    def __init__(self, hparams: dict, cleaning: Cleaning) -> None:
        super().__init__(hparams, cleaning)
        self.gamma, self.epsilon = hparams["gamma"], hparams["epsilon"]
        self.lrs = [hparams["inner_lr"], hparams["outer_lr"]]

    def advance(self, k: int) -> None:
        w = [p.detach().requires_grad_() for p in self.w]
        gw = torch.autograd.grad(self.c.g(*w, self.x, k), w, create_graph=True)
        fw = torch.autograd.grad(self.c.f(*w), w)
        hv = torch.autograd.grad(gw, w, [self.gamma * g for g in gw])
        w = [p.detach() - self.lrs[0] * (f + h) for p, f, h in zip(w, fw, hv, strict=True)]
        w = [p.requires_grad_() for p in w]
        x = self.x.detach().requires_grad_()
        gw = torch.autograd.grad(self.c.g(*w, x, k), w, create_graph=True)
        fw = torch.autograd.grad(self.c.f(*w), w)
        *hv, jv = torch.autograd.grad(gw, [*w, x], [self.gamma * g for g in gw])
        dw = [f + h for f, h in zip(fw, hv, strict=True)]
        self.x = self.x - self.lrs[1] * jv
        self.w = [p.detach() for p in w]
        residual = float(sum((d * d).sum() for d in dw) + (jv * jv).sum())
        if residual <= self.epsilon**2:
            self.gamma, self.epsilon = self.gamma * 1.1, self.epsilon * 0.9


class Ridge:
    """The implicit estimator alone: ridge regression (n = 2000, d = 200) at its exact solution,
    ``hypergrad.get("cg", iters=20)`` through ``solve``."""

    def __init__(self) -> None:
        self.data = RidgeRegression.make(n_train=2000, n_val=500, features=200, seed=0)
        d = self.data
        self.x = {"log_lambda": torch.full((200,), -2.0, dtype=torch.float64)}
        a = d.x_train.T @ d.x_train / 2000 + torch.diag(self.x["log_lambda"].exp())
        self.w = {"w": torch.linalg.solve(a, d.x_train.T @ d.y_train / 2000)}
        self.grad = None

    def outer(self) -> torch.Tensor:
        return self.grad


class RidgeFramework(Ridge):
    def step(self) -> None:
        solver, estimator = bd.solvers.GD(0.1, 0), bd.hypergrad.get("cg", iters=CG_ITERS, tol=0.0)
        self.grad = bd.solve(self.data.problem, self.x, self.w, solver=solver, hypergrad=estimator, check=False)
        self.grad = self.grad.grad["log_lambda"]


def ridge_hand_cg(data: RidgeRegression, w: dict, x: dict, iters: int = CG_ITERS) -> torch.Tensor:
    """The ridge hypergradient by a hand-written autograd double-backward CG from 0."""
    w = w["w"].detach().requires_grad_()
    x = x["log_lambda"].detach().requires_grad_()
    (gw,) = torch.autograd.grad(data.inner_loss({"w": w}, {"log_lambda": x}), w, create_graph=True)
    (fw,) = torch.autograd.grad(data.outer_loss({"w": w}, {}), w)
    v, r = torch.zeros_like(fw), fw
    p, rr = r, (r * r).sum()
    for _ in range(iters):
        (ap,) = torch.autograd.grad(gw, w, p, retain_graph=True)
        alpha = rr / (p * ap).sum()
        v, r = v + alpha * p, r - alpha * ap
        rr_new = (r * r).sum()
        p, rr = r + (rr_new / rr) * p, rr_new
    (jv,) = torch.autograd.grad(gw, x, v)
    return -jv


class RidgeHand(Ridge):
    def step(self) -> None:
        self.grad = ridge_hand_cg(self.data, self.w, self.x)


class FewShotFramework:
    def __init__(self, fewshot, tasks: int) -> None:
        self.variant, self.batches, self.k = fewshot.Recipe(tasks), fewshot._batches(tasks, 4), 0

    def step(self) -> None:
        self.variant.step(self.batches[self.k % 4])
        self.k += 1

    def outer(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.variant.params().values()])


class FewShotHand(FewShotFramework):
    def __init__(self, fewshot, tasks: int) -> None:
        super().__init__(fewshot, tasks)
        self.variant = fewshot.VmapAutograd(tasks)


class FewShotHandDisplaced(FewShotFramework):
    """The hand-written MAML step in the recipe's form: each task adapts a displacement ``δ_t``
    from 0 and its network is ``θ + δ_t`` (``VmapAutograd`` otherwise)."""

    def __init__(self, fewshot, tasks: int) -> None:
        super().__init__(fewshot, tasks)
        self.variant = _displaced(fewshot)(tasks)


def _displaced(fewshot):
    from torch.func import functional_call, vmap

    class Displaced(fewshot.VmapAutograd):
        def meta_grad(self, batch):
            forward = vmap(lambda p, x: functional_call(self.net, p, (x,)))
            inner, outer = batch["inner"], batch["outer"]
            delta = {k: v.new_zeros(self.tasks, *v.shape).requires_grad_() for k, v in self.leaves.items()}
            for _ in range(fewshot.INNER_STEPS):
                fast = {k: self.leaves[k] + d for k, d in delta.items()}
                loss = (forward(fast, inner["x"]) - inner["y"]).pow(2).mean((1, 2)).sum()
                grads = torch.autograd.grad(loss, list(delta.values()), create_graph=True)
                delta = {k: d - fewshot.INNER_LR * g for (k, d), g in zip(delta.items(), grads, strict=True)}
            fast = {k: self.leaves[k] + d for k, d in delta.items()}
            query = (forward(fast, outer["x"]) - outer["y"]).pow(2).mean((1, 2)).mean()
            return dict(zip(self.leaves, torch.autograd.grad(query, list(self.leaves.values())), strict=True))

    return Displaced


def _workloads() -> dict[str, tuple[Callable, Callable, torch.dtype]]:
    import fewshot

    cleaning = Cleaning()
    return {
        "aid": (lambda: Framework("aid", AID, cleaning), lambda: HandAID(AID, cleaning), torch.float64),
        "itd": (lambda: Framework("itd", ITD, cleaning), lambda: HandITD(ITD, cleaning), torch.float64),
        "soba": (lambda: Framework("soba", SOBA, cleaning), lambda: HandSOBA(SOBA, cleaning), torch.float64),
        "penalty": (
            lambda: Framework("penalty", PENALTY, cleaning),
            lambda: HandPenalty(PENALTY, cleaning),
            torch.float64,
        ),
        "maml": (lambda: FewShotFramework(fewshot, 32), lambda: FewShotHand(fewshot, 32), torch.float32),
        "maml, displaced": (
            lambda: FewShotFramework(fewshot, 32),
            lambda: FewShotHandDisplaced(fewshot, 32),
            torch.float32,
        ),
        "cg": (RidgeFramework, RidgeHand, torch.float64),
    }


def measure(name: str, make_ours: Callable, make_hand: Callable, dtype, blocks: int, steps: int) -> dict:
    torch.set_default_dtype(dtype)
    ours, hand = make_ours(), make_hand()
    for _ in range(5):
        ours.step()
        hand.step()
    diff = float((ours.outer() - hand.outer()).abs().max())
    scale = float(hand.outer().abs().max())
    best = {"ours": float("inf"), "hand": float("inf")}
    for _ in range(blocks):
        for label, variant in (("ours", ours), ("hand", hand)):
            start = time.perf_counter()
            for _ in range(steps):
                variant.step()
            best[label] = min(best[label], (time.perf_counter() - start) / steps)
    torch.set_default_dtype(torch.float64)
    return {"name": name, "ours_ms": 1e3 * best["ours"], "hand_ms": 1e3 * best["hand"], "diff": diff, "scale": scale}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, (ours, hand, dtype) in _workloads().items():
        if args.only and name not in args.only:
            continue
        row = measure(name, ours, hand, dtype, args.blocks, args.steps)
        print(row, flush=True)
        rows.append(row)
    if args.only:
        return
    lines = [
        f"Command: `python benchmarks/overhead.py` — {platform.processor() or platform.machine()}, one torch thread, "
        f"torch {torch.__version__}; fastest of {args.blocks} alternating blocks of {args.steps} steps.",
        "",
        "| workload | framework ms/step | hand-written ms/step | ratio | max abs diff of the outer variables "
        "after 5 steps (their scale) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['name']}` | {r['ours_ms']:.2f} | {r['hand_ms']:.2f} | {r['ours_ms'] / r['hand_ms']:.3f} | "
            f"{r['diff']:.1e} ({r['scale']:.1e}) |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
