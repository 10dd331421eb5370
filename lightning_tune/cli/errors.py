"""The command line's error policy, in one place.

A user's mistake (a bad key, value, path or file) ends in one `error:` line and exit code 2; a run
that diverged (NaN/inf loss) in one line and exit code 1; Ctrl-C in exit code 130. Anything else is
a bug and keeps its traceback. `LIGHTNING_TUNE_DEBUG=1` re-raises every error for its traceback.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Callable

USAGE_EXIT = 2
DIVERGED_EXIT = 1
INTERRUPTED_EXIT = 130


class UsageError(ValueError):
    """A mistake in the command line or a config file; printed as one line, exit code 2."""


# jsonargparse's KeyError for a key a config *file* gives that no parameter has (on the command line the
# same key is an ArgumentError); matched by name, as it lives in a private module.
UNKNOWN_KEY_ERROR = "NSKeyError"

# Lines of jsonargparse's nested error reports that say nothing about the user's mistake.
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>", "Given value", "Problem with given class_path", "tip: For details")


def condense_parse_error(message: str) -> str:
    """jsonargparse explains a bad value through every union branch it tried; keep the one line that
    names the key and the problem, e.g. `model.lora_rank: Expected a <class 'int'>. Got value: abc`."""
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith(_NOISE)]
    text = " ".join(kept)
    keys = re.findall(r'Parser key "([^"]+)":\s*', text)
    text = re.sub(r'Parser key "[^"]+":\s*', "", text).strip()
    return f"{'.'.join(keys)}: {text}" if keys else text


def _is_user_error(err: BaseException) -> bool:
    """Ours (`ValueError` subclasses, `UsageError`), jsonargparse's and argparse's, missing files, and
    Lightning's `MisconfigurationException` (e.g. `--trainer.accelerator cuda` without a GPU)."""
    if isinstance(err, (ArgumentError, ValueError, FileNotFoundError)):
        return True
    return type(err).__name__ in ("MisconfigurationException", UNKNOWN_KEY_ERROR)


def exit_code(err: BaseException) -> int | None:
    """The exit code the policy gives `err`, or None when it is a bug (keep the traceback)."""
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED_EXIT
    if isinstance(getattr(err, "exit_code", None), int):  # e.g. DownloadError: 1, the network failed
        return err.exit_code
    if type(err).__name__ == "DivergenceError":
        return DIVERGED_EXIT
    if _is_user_error(err):
        return USAGE_EXIT
    return None


def one_line(err: BaseException) -> str:
    """The `error:` line for `err`."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if type(err).__name__ == "DivergenceError":
        return f"error: {err}"
    if type(err).__name__ == UNKNOWN_KEY_ERROR and err.args:  # str(KeyError) would quote it
        from lightning_tune.cli.suggest import did_you_mean

        text = f"{err.args[0]}: a key no parameter has"
        return f"error: {text}{did_you_mean(text)} (check its spelling in the config files; `fit --help` lists every key)"
    text = str(err) if isinstance(err, UsageError) else condense_parse_error(str(err))
    text = text.strip() or type(err).__name__
    if not isinstance(err, UsageError):
        from lightning_tune.cli.suggest import did_you_mean  # a close key or class name, for a misspelt one

        text += did_you_mean(text)
    return "error: " + " ".join(text.split("\n"))


def run_with_policy(command: Callable[[], int]) -> int:
    """Run `command()` (returns an exit code); map its errors to one line and an exit code.

    `SystemExit` passes through: `--help` and `--print_config` end that way, with code 0.
    """
    try:
        return command()
    except BrokenPipeError:  # `... | head` closed the pipe: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141  # 128 + SIGPIPE, as a shell reports it
    except (Exception, KeyboardInterrupt) as err:
        code = exit_code(err)
        if code is None or os.environ.get("LIGHTNING_TUNE_DEBUG"):
            raise
        print(one_line(err), file=sys.stderr)
        return code
