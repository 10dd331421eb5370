"""What the documentation generators share: write a generated file atomically, or check it is current."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(output: Path, text: str, argv: list[str], command: str) -> int:
    """With `--check` in argv: exit code 1 (and say to run `command`) when `output` differs from
    `text`, else 0. Without: write `text` to `output` atomically (never a half-written document)."""
    if "--check" in argv:
        if not output.is_file() or output.read_text() != text:
            print(f"{output} is stale: run {command}", file=sys.stderr)
            return 1
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(output)
    print(f"wrote {output}")
    return 0
