"""Old path of `lightning_tune.training.callbacks`: every run's saved `config.yaml` names
`lightning_tune.callbacks.AtomicCheckpointIO`."""

from lightning_tune.training.callbacks import AtomicCheckpointIO, DivergenceError, DivergenceGuard, StepSeed

__all__ = ["AtomicCheckpointIO", "DivergenceError", "DivergenceGuard", "StepSeed"]
