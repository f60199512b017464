"""Recipes: ready-made bilevel experiments run with ``bilevel-dist fit --config recipes/...``."""
