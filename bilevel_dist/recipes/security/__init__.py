"""Security audits by bilevel attacks: clean-label poisoning by gradient alignment (Witches'
Brew, thesis ch. 6) on built-in data (Gaussian blobs, digits) and local MNIST/CIFAR-10, and
backdoors in reconstruction; :class:`WitchesBrewAudit` and :class:`BackdoorAudit` run them from
``bilevel-dist test --config recipes/security/….yaml``."""

from bilevel_dist.recipes.security.data import Case, blobs, choose_case, digits, load
from bilevel_dist.recipes.security.module import BackdoorAudit, SecurityData, WitchesBrewAudit
from bilevel_dist.recipes.security.witches_brew import (
    Augmentation,
    Brew,
    CaseResult,
    Victims,
    alignment_loss,
    apply_poison,
    attack_case,
    augment,
    brew,
    flips,
    project,
    success_rate,
    target_gradient,
    train_victims,
)

__all__ = [
    "Augmentation",
    "BackdoorAudit",
    "Brew",
    "Case",
    "CaseResult",
    "SecurityData",
    "Victims",
    "WitchesBrewAudit",
    "alignment_loss",
    "apply_poison",
    "attack_case",
    "augment",
    "blobs",
    "brew",
    "choose_case",
    "digits",
    "flips",
    "load",
    "project",
    "success_rate",
    "target_gradient",
    "train_victims",
]
