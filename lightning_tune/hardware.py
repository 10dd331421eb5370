"""What this machine's CPU computes natively, so a slow choice is named instead of silently taken.

bf16 matrix products run at full speed only on CPUs with bf16 instructions (x86 AVX512-BF16 or AMX,
Arm's BF16 extension). Elsewhere torch emulates them through fp32 conversions: on an AVX2-only CPU a
bf16 matmul measured 1.3 GFLOP/s against ~120 fp32 (issue 21), so bf16 training or generation there is
many times slower than fp32, not faster.
"""

from __future__ import annotations

import logging
import platform
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 instructions torch's kernels use (AVX512-BF16, AMX, Arm BF16)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.system() == "Darwin"  # Apple M2 and later have BF16; /proc is Linux's
        return any(line.startswith("Features") and " bf16" in line for line in flags.splitlines())
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


@cache
def cpu_vendor() -> str | None:
    """The x86 CPU's vendor id ("GenuineIntel", "AuthenticAMD"), or None where /proc/cpuinfo has none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("vendor_id"):
            return line.partition(":")[2].strip() or None
    return None


@cache
def cpu_has_amx() -> bool:
    """True when this CPU has AMX tiles (Intel Sapphire Rapids and later), where oneDNN's bf16 matmuls run
    several times the fp32 peak (issue 37: 2280 against 371 GFLOP/s on 2 cores)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_precision_advice(precision: str) -> str | None:
    """One line for a CPU run in fp32 on a CPU with AMX: bf16-mixed is the fast choice there; None otherwise."""
    if str(precision) in ("32", "32-true", "32.0") and cpu_has_amx():
        return "note: this CPU has AMX, where bf16 matmuls run several times fp32's: --trainer.precision bf16-mixed is the fast choice here (fp32 master weights and adapters)"
    return None


def bf16_emulation_warning(what: str) -> str | None:
    """The one-line warning for running `what` (e.g. "precision bf16-mixed") in bf16 on this CPU, or None
    when its bf16 is native."""
    if cpu_has_native_bf16():
        return None
    return f"{what} on a CPU without native bf16 (no AVX512-BF16/AMX/Arm BF16): bf16 is emulated here and much slower than fp32; use precision 32 / dtype float32 on this machine"


def warn_if_bf16_emulated(what: str) -> bool:
    """Log `bf16_emulation_warning(what)` if it applies; True when it did."""
    message = bf16_emulation_warning(what)
    if message:
        log.warning(message)
    return message is not None
