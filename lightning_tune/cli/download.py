"""`download REPO_ID|SIZE [--output_dir DIR] [--hf_token T] [--revision R]`: the files the recipes load,
from the Hugging Face Hub (`lightning_tune.checkpoint.download` does the transfer). A named size (`llama3_1_8b`,
see `ls`) stands for the repository its numbers come from. Usage mistakes exit 2, Hub
and network failures exit 1, each in one line."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning_tune.cli.errors import UsageError


def main(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from lightning_tune.checkpoint.download import download

    parser = ArgumentParser(
        prog="python -m lightning_tune download",
        description="Download a checkpoint of a supported family from the Hugging Face Hub: weights (safetensors, else .bin, else Meta .pth), config and one tokenizer (tokenizer.model, else tokenizer.json with its config and chat template) only.",
        exit_on_error=False,
        default_env=False,
    )
    parser.add_argument("repo_id", type=str, help="Hub repository, e.g. meta-llama/Llama-2-7b-hf, or a named size such as llama2_7b (see ls).")
    parser.add_argument("--output_dir", type=str | None, default=None, help="Where to put the files (default: checkpoints/REPO_ID, the path the bundled configs use).")
    parser.add_argument("--hf_token", type=str | None, default=None, help="Hugging Face access token (default: HF_TOKEN or the stored `hf auth login`).")
    parser.add_argument("--revision", type=str | None, default=None, help="Branch, tag or commit (default: main).")
    cfg = parser.parse_args(argv)
    if "/" not in cfg.repo_id:
        cfg.repo_id = repo_of_size(cfg.repo_id)
    if cfg.repo_id.count("/") != 1 or not all(cfg.repo_id.split("/")):
        raise UsageError(f"repo_id: expected OWNER/NAME, e.g. meta-llama/Llama-2-7b-hf, got {cfg.repo_id!r}")
    output_dir = Path(cfg.output_dir or Path("checkpoints") / cfg.repo_id)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir: {output_dir} exists and is not a directory")
    files = download(cfg.repo_id, output_dir, cfg.hf_token, cfg.revision)
    size = sum(f.stat().st_size for f in files if f.is_file())
    print(f"downloaded {len(files)} files ({size / 2**30:.2f} GiB) to {output_dir}")
    # load_tokenizer takes the directory: tokenizer.json where there is one, else tokenizer.model.
    if not any((output_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        print(f"warning: {cfg.repo_id} has neither tokenizer.json nor tokenizer.model; set data.tokenizer_path to its tokenizer", file=sys.stderr)
    print(f"use it with: --model.init_args.checkpoint_dir {output_dir} (data.tokenizer_path defaults to its tokenizer)")
    return 0


def repo_of_size(name: str) -> str:
    """The Hub repository a named size's numbers come from (`families/`), or a one-line UsageError."""
    from lightning_tune.families import SIZES

    if name not in SIZES:
        raise UsageError(f"repo_id: expected OWNER/NAME (e.g. meta-llama/Llama-2-7b-hf) or a named size ({', '.join(n for n, s in SIZES.items() if s.repo)}), got {name!r}")
    repo = SIZES[name].repo
    if repo is None:
        raise UsageError(f"repo_id: {name} is a size of our own with no Hub repository; give OWNER/NAME")
    return repo
