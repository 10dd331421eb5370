"""`data --config X [--data.KEY VALUE ...] [--n 3] [--prepare]`: the first training samples decoded, masked
spans marked, and their token counts (per source for a mixture). `--prepare` only builds the tokenised cache
(each mixture source's) and says where it is, so the ranks of a multi-GPU run read it instead of all tokenising.

The config is read by the recipe parser `fit` uses (`make_cli`, parse only), so `data` sees the
data module `fit` would build; only the data module is instantiated (no model, no trainer).
"""

from __future__ import annotations

from lightning_tune.cli.errors import UsageError
from lightning_tune.cli.parser import CONFIG_OPTIONS_HELP

USAGE = (
    "usage: python -m lightning_tune data --config FILE_OR_NAME [--data.KEY VALUE ...] [--n N]\n\n"
    + __doc__
    + "\n"
    + CONFIG_OPTIONS_HELP
    + "\n  --n N                   how many samples to print (default 3)"
    + "\n  --prepare               build the tokenised cache only (ahead of a multi-GPU run) and print where it is"
)


def split_n(argv: list[str]) -> tuple[int, list[str]]:
    """(`--n` value, the other arguments): `--n` is this verb's, the rest goes to the recipe parser."""
    n, rest, i = 3, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--n" or arg.startswith("--n="):
            value = arg[4:] if arg.startswith("--n=") else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if arg.startswith("--n=") else 2
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"--n: expected a positive integer, got {value!r}")
            n = int(value)
            continue
        rest.append(arg)
        i += 1
    return n, rest


def main(argv: list[str]) -> int:
    from lightning_tune.cli.parser import make_cli
    from lightning_tune.data.inspect import describe_samples

    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    prepare = "--prepare" in argv
    n, rest = split_n([arg for arg in argv if arg != "--prepare"])
    cli = make_cli(rest, run=False, instantiate=False)
    config = cli.config.clone()
    group = cli.parser.groups["data"]
    if hasattr(group, "instantiate_class"):
        group.instantiate_class(group, config)  # the same instantiation LightningCLI does for `data`
        datamodule = config.data
    else:  # `data: {class_path: ..., init_args: ...}` (e.g. ChatDataModule): build the named class
        import importlib

        module, _, name = config.data.class_path.rpartition(".")
        datamodule = getattr(importlib.import_module(module), name)(**config.data.init_args.as_dict())
    if prepare:
        datamodule.prepare_data()
        print("\n".join(datamodule.cache_report()))
        return 0
    print(describe_samples(datamodule, n))
    return 0
