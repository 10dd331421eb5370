"""`python -m lightning_tune validate --config X [overrides]`: check a config and estimate its memory, without training.

The config is read by the recipe parser `fit` uses; `lightning_tune.validate.check` finds the
problems (missing paths, refused strategies) and the memory estimate, printed here.

Exit codes: 0 valid (and fits a present GPU), 2 bad config, missing paths or refused strategy,
1 estimated not to fit the GPU of this machine.
"""

from __future__ import annotations

import sys

USAGE = "usage: python -m lightning_tune validate --config FILE_OR_NAME [--KEY VALUE ...]\n\n" + __doc__


def main(argv: list[str]) -> int:
    """Print the checks and the estimate; return the exit code (see the module docstring)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    import torch

    from lightning_tune.memory import GIB
    from lightning_tune.validate import check

    result = check(argv)
    for line in result.problems:
        print(f"error: {line}", file=sys.stderr)
    if result.estimate is None:
        print("error: model_name: null needs an existing checkpoint_dir to read the architecture from; cannot estimate memory", file=sys.stderr)
        return 2
    model, s = result.model, result.settings
    rows = f" pairs ({s['batch_size']} rows)" if s["batch_size"] != result.data.batch_size else ""
    print(f"recipe                {type(model).__name__} ({model.model_name or model.checkpoint_dir})")
    print(
        f"run                   batch_size {result.data.batch_size}{rows} x max_seq_len {s['seq_len']}, precision {s['precision']}, "
        f"activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}, strategy {s['strategy']}, "
        f"{s['devices']} device(s) x {s['num_nodes']} node(s)"
    )
    device_memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    for line in result.estimate.lines(device_memory):
        print(line)
    if s["strategy"] == "fsdp" and not s["fsdp_wrapped_layers"] and s["devices"] * s["num_nodes"] == 1:
        print("note: FSDP without auto_wrap_policy gathers the whole model for compute (counted above); --trainer.strategy fsdp2 shards each decoder layer", file=sys.stderr)
    if result.problems:
        return 2
    if device_memory is not None and result.estimate.total > device_memory:
        print(
            f"error: estimated peak {result.estimate.total / GIB:.1f} GiB exceeds this GPU's {device_memory / GIB:.1f} GiB; "
            "lower data.batch_size, enable activation_checkpointing, use bf16-true, or use more devices with --trainer.strategy fsdp2",
            file=sys.stderr,
        )
        return 1
    print("config OK")
    return 0
