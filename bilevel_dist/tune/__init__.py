"""Ray Tune sweeps over recipe configs (``bilevel-dist tune``); needs the ``[tune]`` extra."""

from bilevel_dist.tune.search import Search, load, parse
from bilevel_dist.tune.sweep import prepare, run
from bilevel_dist.tune.trial import set_key, trial_config, with_settings

__all__ = ["Search", "load", "parse", "prepare", "run", "set_key", "trial_config", "with_settings"]
