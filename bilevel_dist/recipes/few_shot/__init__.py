"""Few-shot meta-learning, the tasks of a meta-batch one batched lower level:
``bilevel-dist fit --config recipes/few_shot/sinusoid.yaml``."""

from bilevel_dist.recipes.few_shot.data import DATASETS, FewShotData
from bilevel_dist.recipes.few_shot.methods import METHODS, Formulation
from bilevel_dist.recipes.few_shot.models import build
from bilevel_dist.recipes.few_shot.module import BASELINES, DEFAULT_ALGORITHMS, FewShot, algorithm_spec, confidence
from bilevel_dist.recipes.few_shot.tasks import ClassPool, Episode, Sinusoid, rotated_digits, task_generator

__all__ = [
    "BASELINES",
    "DATASETS",
    "DEFAULT_ALGORITHMS",
    "METHODS",
    "ClassPool",
    "Episode",
    "FewShot",
    "FewShotData",
    "Formulation",
    "Sinusoid",
    "algorithm_spec",
    "build",
    "confidence",
    "rotated_digits",
    "task_generator",
]
