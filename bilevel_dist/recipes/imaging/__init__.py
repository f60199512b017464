"""Learned image reconstruction: one lower-level problem per image (Crockett & Fessler's review,
BIO, and energy learning by parametric majorizers)."""

from bilevel_dist.recipes.imaging.bio_module import BIOReconstruction
from bilevel_dist.recipes.imaging.data import ImagingData
from bilevel_dist.recipes.imaging.module import LearnedReconstruction

__all__ = ["BIOReconstruction", "ImagingData", "LearnedReconstruction"]
