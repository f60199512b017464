"""bilevel_dist: hypergradients and bilevel algorithms on PyTorch, Lightning and Ray."""

from bilevel_dist import hypergrad, solvers
from bilevel_dist.api import solve
from bilevel_dist.hypergrad.base import Solution
from bilevel_dist.problem import BilevelProblem

__version__ = "0.1.0"

__all__ = ["BilevelProblem", "Solution", "__version__", "hypergrad", "solve", "solvers"]
