"""Old path of `lightning_tune.use_onednn_linears_` (`lightning_tune.layers.onednn`), kept for one release."""

from lightning_tune.layers.onednn import use_onednn_linears_

__all__ = ["use_onednn_linears_"]
