"""Old path of `lightning_tune.LMEvalCallback` (`lightning_tune.evaluation.callback`), named in configs
written before the re-layout."""

from lightning_tune.evaluation.callback import LMEvalCallback

__all__ = ["LMEvalCallback"]
