""" "Did you mean": the closest key or class name for a misspelt one in a one-line error (#30).

`did_you_mean(text)` reads the misspelt name from the error text (jsonargparse's and ours) and compares
it with what exists: the parameters of the Trainer, of every recipe and data module this package
exports (their whole `__init__` chains, as jsonargparse follows `**kwargs`), and those classes' names.
Torch and Lightning are imported only when the text names a misspelt key or class (they are loaded by
then: the parse that failed imported them).
"""

from __future__ import annotations

import difflib
import inspect
import re

# What a misspelt key or class looks like in the errors (jsonargparse's wording, and ours in errors.py).
KEY_PATTERNS = (
    re.compile(r"Option '([\w.]+)' is not accepted"),
    re.compile(r"unrecognized arguments: --([\w.]+)"),
    re.compile(r"does not accept option '([\w.]+)'"),
    re.compile(r"^([\w.]+): a key no parameter has"),
)
CLASS_PATTERN = re.compile(r"Expected a path but ([\w.]+) either not accessible")
SKIPPED = {"self", "args", "kwargs"}


def exported_classes() -> dict[str, type]:
    """The recipes and data modules `lightning_tune` exports, by name."""
    import lightning_tune

    classes = {}
    for name in lightning_tune.__all__:
        try:
            value = getattr(lightning_tune, name)
        except Exception:  # noqa: BLE001 - a module that fails to import is reported where it is used
            continue
        if inspect.isclass(value) and any(base.__name__ in ("LightningModule", "LightningDataModule") for base in value.__mro__):
            classes[name] = value
    return classes


def parameters(cls: type) -> set[str]:
    """The `__init__` parameters of `cls` and of its bases (what `**kwargs` passes on)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            try:
                names |= set(inspect.signature(init).parameters) - SKIPPED
            except (TypeError, ValueError):
                continue
    return names


def key_candidates(section: str) -> set[str]:
    """The keys a section (`trainer`, `model`, `data`) can take, without the section prefix."""
    if section == "trainer":
        import lightning.pytorch as pl

        return parameters(pl.Trainer)
    keys: set[str] = set()
    for cls in exported_classes().values():
        keys |= parameters(cls)
    return keys


def closest(name: str, candidates: set[str]) -> str | None:
    """The close match (case-insensitive), or None."""
    by_lower = {c.lower(): c for c in candidates}
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.75)
    return by_lower[match[0]] if match and by_lower[match[0]] != name else None


def did_you_mean(text: str) -> str:
    """ "; did you mean X?" for the misspelt key or class `text` names, or "" when none is close."""
    match = CLASS_PATTERN.search(text)
    if match is not None:
        found = closest(match.group(1).rpartition(".")[2], set(exported_classes()))
        return f"; did you mean lightning_tune.{found}?" if found else ""
    for pattern in KEY_PATTERNS:
        match = pattern.search(text)
        if match is None:
            continue
        key = match.group(1)
        section = key.split(".")[0] if "." in key else text.split(":")[0].strip() if text.split(":")[0].strip() in ("model", "data", "trainer") else "model"
        leaf = key.rpartition(".")[2]
        found = closest(leaf, key_candidates(section))
        if found is None:
            return ""
        return f"; did you mean {key.rpartition('.')[0] + '.' if '.' in key else ''}{found}?"
    return ""
