"""Data denoising by learned importance weights: ``bilevel-dist fit --config recipes/data_denoising/digits.yaml``."""

from bilevel_dist.recipes.data_denoising.data import CIFAR10Data, DigitsData, MNISTData, NoisyLabels, SVHNData
from bilevel_dist.recipes.data_denoising.module import BASELINES, Denoising, fit_digits, weight_histogram
from bilevel_dist.recipes.data_denoising.noise import corrupt

__all__ = [
    "BASELINES",
    "CIFAR10Data",
    "Denoising",
    "DigitsData",
    "MNISTData",
    "NoisyLabels",
    "SVHNData",
    "corrupt",
    "fit_digits",
    "weight_histogram",
]
