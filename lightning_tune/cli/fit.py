"""`fit` and `test`: a recipe run through LightningCLI (`lightning_tune.cli.parser.make_cli`).

Lightning's own `validate` loop is not offered: our `validate` verb checks a config instead.
"""

from __future__ import annotations


def fit(argv: list[str]) -> int:
    """`fit --config FILE_OR_NAME [--KEY VALUE ...] [--ckpt_path FILE|last]`: train, checkpoint, export."""
    from lightning_tune.cli.parser import make_cli

    make_cli(["fit", *argv])
    return 0


def test(argv: list[str]) -> int:
    """`test --config FILE_OR_NAME --ckpt_path FILE`: the loss on the held-out split."""
    from lightning_tune.cli.parser import make_cli

    make_cli(["test", *argv])
    return 0
