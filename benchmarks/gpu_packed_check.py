"""GPU check of packed attention: one varlen flash-attention call, no host sync, same numbers as the loop.

On a CUDA machine (run by gpu_check.sh): a Llama-shaped model in bf16 runs a packed batch forward and
backward with `torch.cuda.set_sync_debug_mode("error")`, so any host-device sync inside the model
raises; then the varlen route is compared with the per-sample SDPA loop (the CPU route) on the same
weights and tokens, and both are timed. Prints one line per check and exits 1 if one fails.

    python benchmarks/gpu_packed_check.py [--layers 4] [--dim 2048]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_tune import model as model_module  # noqa: E402
from lightning_tune.model import CausalLM, ModelConfig, PackedRows  # noqa: E402


def timed(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=32, help="packed samples per row")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_packed_check: no CUDA device; nothing checked")
        return 1
    if model_module.varlen_attention() is None:
        print(f"gpu_packed_check: torch {torch.__version__} has no torch.nn.attention.varlen; packed attention uses the per-sample loop")
        return 1
    device = torch.device("cuda")
    config = ModelConfig(vocab_size=32000, num_layers=args.layers, num_heads=args.dim // 128, num_kv_heads=max(1, args.dim // 512), embed_dim=args.dim, intermediate_dim=args.dim * 8 // 3 // 64 * 64)
    torch.manual_seed(0)
    with device:
        model = CausalLM(config)
    model.init_weights()
    model.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    lengths = [[int(n) for n in torch.randint(16, 512, (args.samples,), generator=generator)] for _ in range(2)]
    T = max(sum(row) for row in lengths)
    lengths = [row[:-1] + [row[-1] + T - sum(row)] for row in lengths]  # both rows fill T
    tokens = torch.randint(0, config.vocab_size, (2, T), device=device)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).to(device)
    ok = True

    def step() -> torch.Tensor:
        hidden = model.hidden_states(tokens, positions, seq_lens=lengths)
        hidden.float().square().mean().backward()
        return hidden

    step()  # warm-up outside the sync check (allocator, kernels' first use)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        varlen_out = step().detach()
        print("no host sync in a packed forward + backward: OK")
    except RuntimeError as err:
        print(f"host sync in a packed forward + backward: FAIL ({str(err).splitlines()[0]})")
        ok = False
        varlen_out = None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    varlen_s = timed(step)

    build = PackedRows.build
    PackedRows.build = staticmethod(lambda lengths, batch_size, device: PackedRows(lengths))  # the per-sample loop
    try:
        model.zero_grad()
        loop_out = step().detach()
        loop_s = timed(step)
    finally:
        PackedRows.build = build
    if varlen_out is not None:
        # Both routes are flash attention in bf16 over the same samples; outputs differ only by the
        # kernels' accumulation order, a few bf16 ulps (2^-8 relative) after the layers.
        err = ((varlen_out.float() - loop_out.float()).norm() / loop_out.float().norm()).item()
        good = err <= 2e-2
        ok &= good
        print(f"varlen vs per-sample loop, hidden states rel err {err:.2e}: {'OK' if good else 'FAIL'}")
    tokens_per_step = 2 * T
    print(
        f"packed step ({args.layers} layers, dim {args.dim}, 2 x {T} tokens, {args.samples} samples/row): varlen {varlen_s * 1e3:.1f} ms ({tokens_per_step / varlen_s:,.0f} tok/s), per-sample loop {loop_s * 1e3:.1f} ms: {loop_s / varlen_s:.2f}x"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
