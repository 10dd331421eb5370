"""Files, safely: the one-line CheckpointError, JSON and weights-only torch reads, atomic directories with an
export manifest (nothing of the user's is replaced), disk space and fsync."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """One-line, user-facing: names the path and what is missing or mismatched."""


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def require(data: dict, key: str, path: Path):
    if key not in data:
        raise CheckpointError(f"{path}: missing required key {key!r}")
    return data[key]


def torch_load_weights_only(path: Path, map_location: object = "cpu", *, mmap: bool = False) -> object:
    """`torch.load(path, weights_only=True)` with every failure one `CheckpointError` line.

    torch's own message for a refused file advises loading it with `weights_only=False`, which runs
    whatever code the file holds; it is never repeated. A file that is not torch's format at all (a zip
    archive, or a legacy protocol-2 pickle) is said to be so, not "Python objects".
    """
    import pickle
    import zipfile

    try:
        with path.open("rb") as file:
            head = file.read(2)
        is_zip = zipfile.is_zipfile(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    if not is_zip and head != b"\x80\x02":
        raise CheckpointError(f"{path}: not a torch checkpoint (torch.save writes a zip archive; this file is not one)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # a class or function the file would import and call
            raise CheckpointError(
                f"{path}: refused: the file holds Python objects other than tensors and plain containers, which could run code when loaded (only weights-only files are read)"
            ) from None
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint (corrupt, or not written by torch.save)") from None
    except Exception as err:  # noqa: BLE001 - every unreadable file gets one line
        lines = [line for line in str(err).strip().splitlines() if line.strip() and "weights_only" not in line]
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({lines[0] if lines else type(err).__name__})") from None


# --------------------------------------------------------------------------------------------------
# Writing


# Written into every export directory: its kind and the files the export wrote. An export replaces
# only an empty directory or a previous export of its kind holding nothing else (`check_export_target`).
EXPORT_MANIFEST = ".lightning_tune_export.json"


def check_export_target(path: str | Path, kind: str) -> Path:
    """`path` as an absolute path if an export of `kind` ("peft", "hf") may be written there, else one
    `CheckpointError` line.

    An export replaces its directory whole, so it may replace only what the project wrote: nothing
    (a new or empty directory) or a previous export of the same kind, whose manifest lists every
    file in it. Anything else (a file, a directory holding other files, another kind's export, the
    current directory or one above it) is refused, so no file the user put there is ever deleted.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory; name a new directory for the {kind} export")
    cwd = Path.cwd().resolve()
    if path.resolve() in (cwd, *cwd.parents):
        raise CheckpointError(f"{path}: is the current directory (or holds it); an export replaces its output directory whole, so name a new one, e.g. ./{kind}")
    try:
        names = sorted(entry.name for entry in path.iterdir())
        manifest = json.loads((path / EXPORT_MANIFEST).read_text()) if EXPORT_MANIFEST in names else None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read this directory ({err}); name a new directory for the {kind} export") from None
    if not names:
        return path
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise CheckpointError(f"{path}: not empty ({listed}) and not a previous export; an export replaces its output directory whole, so name a new or empty one")
    if manifest.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a previous {manifest.get('kind')!r} export, not a {kind!r} one; name another directory")
    others = [name for name in names if name != EXPORT_MANIFEST and name not in manifest["files"]]
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise CheckpointError(f"{path}: holds files the previous export did not write ({listed}); move them out or name another directory")
    return path


@contextmanager
def atomic_directory(path: str | Path, kind: str = "export") -> Iterator[Path]:
    """Yield an empty temporary sibling directory; on success it replaces `path`, on error it is removed.

    Readers see the old directory or the complete new one, never a half-written export. The old
    one is moved aside and deleted only after the new one is in place, and only if it is empty or a
    previous export of the same `kind` (`check_export_target`, checked before and again at the end).
    The new directory gets a manifest (`EXPORT_MANIFEST`) of its kind and files.
    """
    path = check_export_target(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0o700
        yield tmp
        files = sorted(entry.name for entry in tmp.iterdir())
        (tmp / EXPORT_MANIFEST).write_text(json.dumps({"kind": kind, "files": files}, indent=2) + "\n")
        check_export_target(path, kind)  # the export took a while: is the target still ours to replace?
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)  # put the previous export back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def existing_parent(path: Path) -> Path:
    """The nearest existing ancestor of `path` (where the disk space will come from)."""
    while not path.exists():
        path = path.parent
    return path


def format_bytes(n: int) -> str:
    """A byte count in the unit that shows it: "512 bytes", "3.4 MiB", "12.50 GiB" (never "0.00 GiB")."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_disk_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise CheckpointError(f"{directory}: not enough free disk space: need {format_bytes(needed)}, have {format_bytes(free)}")


def fsync_directory(directory: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write the new file to; on success it replaces `path`, on any
    error or interruption it is removed: readers see the previous file or the complete new one, never a torn one.

    The temporary file is `.<name>.tmp-XXXX` in the same directory (the rename cannot cross file systems);
    a killed writer's leftover for this name is removed first (one writer per path). After the block the
    file is fsynced, made 0o644, `os.replace`d into place, and the directory fsynced.
    """
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data written through any handle reaches the disk before the rename
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0o600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """`path.write_text(text)` (UTF-8) through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
