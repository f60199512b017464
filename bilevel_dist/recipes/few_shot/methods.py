"""Few-shot methods as bilevel problems whose lower levels are the tasks of a meta-batch.

Every inner variable has a leading task axis; the network runs on each task under
``torch.func.vmap`` (one vectorised computation, batch statistics per task). Losses follow the
batched convention (:mod:`bilevel_dist.oracles`): the inner loss is the *sum* over tasks of each
task's support loss, so each task's gradient is its own; the outer loss is the sum over tasks of
query losses divided by the global meta-batch ``M``, so the meta-gradient, summed over ranks, is
the mean over the meta-batch.

Formulations (``kind``):

- ``init``: MAML, first-order MAML, iMAML. The inner variable is each task's displacement
  ``δ_t`` from the meta-parameters ``θ`` (starting at 0), the task's network is ``θ + δ_t``.
  Reverse-mode ITD through the inner steps gives MAML's second-order meta-gradient; keeping only
  ``∂f/∂θ`` gives first-order MAML; iMAML adds ``λ/2 ‖δ_t‖²`` (its proximal term) and takes the
  implicit (CG) hypergradient.
- ``head_init``: ANIL: the same, with only the head displaced.
- ``heads``: Penalty (Mehra & Hamm Eq. 4) and any registry algorithm: the representation (the
  body) is the outer variable, each task's linear head (from 0, ridge ``reg/2 ‖W_t‖²``) the
  inner one.
- ``prototypes``: Prototypical Networks: each task's class centres ``c`` minimise
  ``Σ_i ½‖φ(x_i) − c_{y_i}‖² / K``, whose one gradient step of size 1 from 0 is the class mean.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap
from torchmetrics.functional.classification import multiclass_accuracy

from bilevel_dist.problem import BilevelProblem
from bilevel_dist.recipes.few_shot.models import Backbone
from bilevel_dist.tree import Tree

KINDS = {
    "maml": "init",
    "fomaml": "init",
    "imaml": "init",
    "anil": "head_init",
    "penalty": "heads",
    "heads": "heads",
    "protonet": "prototypes",
    "pretrain": "heads",
}
METHODS = tuple(KINDS)


@dataclass
class Formulation:
    """The bilevel problem of one method on ``net``.

    Args:
        kind: ``init``, ``head_init``, ``heads`` or ``prototypes`` (module docstring).
        net: the backbone (its parameters are not used: the variables are trees).
        regression: mean squared error instead of cross-entropy.
        meta_batch: ``M``, the global number of tasks per meta-step.
        ways: classes per task (heads and prototypes), 1 for regression.
        prox: iMAML's ``λ`` (0: none).
        reg: the heads' ridge weight.
        feature_scale: ``s > 0`` scores heads on ``s φ/‖φ‖`` (cosine-normalised features, as the
            Penalty authors' code with ``s = 10``): the body cannot shrink ``‖∇_W g‖²`` by
            shrinking its features; 0 keeps ``φ``.
    """

    kind: str
    net: Backbone
    regression: bool
    meta_batch: int
    ways: int
    prox: float = 0.0
    reg: float = 0.0
    feature_scale: float = 0.0

    def on_features(self) -> Formulation:
        """The same problem on precomputed features (an identity body, no outer variables)."""
        identity = Backbone(torch.nn.Identity(), self.net.features, self.net.head.out_features)
        return replace(self, net=identity, feature_scale=0.0)  # precomputed features are scaled already

    @property
    def problem(self) -> BilevelProblem:
        """The two losses as a batched bilevel problem."""
        return BilevelProblem(self.inner_loss, self.outer_loss, batched=True)

    # -- variables ---------------------------------------------------------------------------
    def outer_init(self) -> Tree:
        """The meta-parameters at the network's initialisation."""
        params = {k: v.detach().clone() for k, v in self.net.named_parameters()}
        if self.kind in ("heads", "prototypes"):
            return {k: v for k, v in params.items() if k.startswith("body.")}
        return params

    def inner_init(self, outer: Tree, batch: dict[str, Tensor]) -> Tree:
        """Each task's starting inner variables (zeros with a leading task axis)."""
        tasks, like = batch["x"].shape[0], next(iter(outer.values()), batch["x"])
        if self.kind == "init":
            return {k: v.new_zeros((tasks, *v.shape)) for k, v in outer.items()}
        if self.kind == "head_init":
            return {k: v.new_zeros((tasks, *v.shape)) for k, v in outer.items() if k.startswith("head.")}
        width = self.net.features
        if self.kind == "heads":
            return {"weight": like.new_zeros(tasks, self.ways, width), "bias": like.new_zeros(tasks, self.ways)}
        return {"centre": like.new_zeros(tasks, self.ways, width)}

    # -- the network per task ----------------------------------------------------------------
    def features(self, outer: Tree, x: Tensor) -> Tensor:
        """``body(x)`` for each task's samples: ``(T, n, features)``."""
        body = {k[5:]: v for k, v in outer.items() if k.startswith("body.")}
        phi = vmap(lambda xs: functional_call(self.net.body, body, (xs,)))(x)
        if self.feature_scale and self.kind == "heads":
            phi = self.feature_scale * phi / phi.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return phi

    def scores(self, inner: Tree, outer: Tree, x: Tensor) -> Tensor:
        """Each task's predictions ``(T, n, outputs)`` with its adapted variables."""
        if self.kind == "init":
            params = {k: v + inner[k] for k, v in outer.items()}
            return vmap(lambda p, xs: functional_call(self.net, p, (xs,)))(params, x)
        phi = self.features(outer, x)
        if self.kind == "prototypes":
            c = inner["centre"]
            return 2 * torch.einsum("tnd,tkd->tnk", phi, c) - c.pow(2).sum(-1)[:, None] - phi.pow(2).sum(-1)[..., None]
        if self.kind == "head_init":
            weight, bias = outer["head.weight"] + inner["head.weight"], outer["head.bias"] + inner["head.bias"]
        else:
            weight, bias = inner["weight"], inner["bias"]
        return torch.einsum("tnd,tkd->tnk", phi, weight) + bias[:, None]

    def task_losses(self, scores: Tensor, y: Tensor) -> Tensor:
        """Each task's mean loss: ``(T,)``."""
        if self.regression:
            return (scores - y).pow(2).flatten(1).mean(1)
        return F.cross_entropy(scores.transpose(1, 2), y, reduction="none").mean(1)

    # -- the two levels ----------------------------------------------------------------------
    def inner_loss(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        """Sum over tasks of the support loss (plus iMAML's proximal term or the heads' ridge)."""
        if self.kind == "prototypes":
            phi, c = self.features(outer, batch["x"]), inner["centre"]
            onehot = F.one_hot(batch["y"], self.ways).to(c)
            shots = batch["y"].shape[1] / self.ways
            return (phi - torch.einsum("tnk,tkd->tnd", onehot, c)).pow(2).sum() / (2 * shots)
        loss = self.task_losses(self.scores(inner, outer, batch["x"]), batch["y"]).sum()
        if self.prox:
            loss = loss + 0.5 * self.prox * sum(v.pow(2).sum() for v in inner.values())
        if self.kind == "heads" and self.reg:
            loss = loss + 0.5 * self.reg * inner["weight"].pow(2).sum()
        return loss

    def outer_loss(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        """Sum over tasks of the query loss, divided by the global meta-batch."""
        return self.task_losses(self.scores(inner, outer, batch["x"]), batch["y"]).sum() / self.meta_batch

    def task_scores(self, inner: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tensor:
        """Each task's query score: accuracy (classification) or mean squared error."""
        scores = self.scores(inner, outer, batch["x"])
        if self.regression:
            return self.task_losses(scores, batch["y"])
        return multiclass_accuracy(
            scores.transpose(1, 2), batch["y"], self.ways, average="micro", multidim_average="samplewise"
        )
