"""Third-party output that says nothing about the user's run, filtered at the CLI's entry point (#30).

Exactly these messages, matched from their start, and nothing broader: any other warning or log line of
the same libraries still shows. Each entry names where it comes from and why it is irrelevant here.
No torch, no Lightning imported: filters attach to warnings' list and to loggers by name.
"""

from __future__ import annotations

import logging
import re
import warnings

# (message start, category): warnings.filterwarnings matches the message from its start.
WARNINGS = (
    # torch's pytree deprecation, raised by Lightning's own utilities/_pytree.py on every run: Lightning's to fix.
    ("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning),
    # torch.set_vital, called by torchdata's StatefulDataLoader (our resumable loader) on every run.
    ("'set_vital' is deprecated, please do not call", UserWarning),
)

# logger name -> message starts dropped from it.
LOG_LINES = {
    # Lightning's advert for its cloud logger, printed by every Trainer (both names: whichever rank_zero module loads last logs).
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip: For seamless cloud logging",),
    "lightning.fabric.utilities.rank_zero": ("💡 Tip: For seamless cloud logging",),
    # bitsandbytes on AVX512-BF16 CPUs, at import, when the optional `kernels` package is absent: NF4 still works without it.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # datasets' JSON loader logs pyarrow's ArrowInvalid before raising; our one `error:` line names the file and line instead.
    "datasets.packaged_modules.json.json": ("Failed to load JSON from file",),
}


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def filter_known_noise() -> None:
    """Install the filters (once per logger; the warnings filters are idempotent)."""
    for start, category in WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    for name, starts in LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(starts))
