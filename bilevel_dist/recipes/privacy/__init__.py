"""Privacy audit of federated updates by gradient inversion (Geiping et al. 2020; thesis ch. 5)."""

from bilevel_dist.recipes.privacy.algorithm import Inversion
from bilevel_dist.recipes.privacy.data import AuditData
from bilevel_dist.recipes.privacy.module import GradientInversion

__all__ = ["AuditData", "GradientInversion", "Inversion"]
