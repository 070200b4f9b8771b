"""The 0.1 home of the MLRC protocol, which now lives in :mod:`dmlkit.folds` (shared with tune)."""

from dmlkit.folds import FOLDS, run_mlrc

__all__ = ["FOLDS", "run_mlrc"]
