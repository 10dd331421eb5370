"""Time to first token and decode speed of `lightning_tune.generate` vs transformers `generate`.

Both run greedy decoding on the same random weights of a Llama 2 shaped model, on the same machine,
in the same process, runs interleaved; each figure is the median of `--runs` runs after one
warm-up run. Timestamps come from the per-token callback of each library (our `on_tokens`, HF's
`streamer`), so both measure the same thing: when a token becomes available to a caller.

    python benchmarks/generate_bench.py                      # vocab 32000, dim 512, 8 layers, fp32, batch 1
    python benchmarks/generate_bench.py --batch 4 --threads 2

Needs transformers (pip install 'lightning_tune[test]').
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lightning_tune.generate import GenerationTimer, generate  # noqa: E402
from lightning_tune.model import llama2  # noqa: E402


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
    (reading every weight once), so this is the floor any eager implementation pays per token.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    w = linears[0].weight
    inputs = {m.in_features: torch.randn(batch, m.in_features, dtype=w.dtype) for m in linears}
    with torch.no_grad():
        times = []
        for _ in range(repeats + 1):  # the first pass is a warm-up
            start = time.perf_counter()
            for m in linears:
                m(inputs[m.in_features])
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (default: = heads)")
    parser.add_argument("--mlp", type=int, default=1376)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
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
    hf = transformers.LlamaForCausalLM(config).to(dtype).eval()
    # No EOS, no minimum length: both must produce exactly --new-tokens tokens.
    hf.generation_config.bos_token_id = None
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ours = llama2(args.vocab, args.layers, args.heads, kv_heads, args.dim, args.mlp, max_seq_len=max_len).to(dtype).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)

    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_len))

    def run_ours() -> tuple[float, float, list[list[int]]]:
        timer = GenerationTimer()
        out = generate(ours, prompts.tolist(), args.new_tokens, on_tokens=timer)
        s = timer.stats()
        return s.prefill_s, s.decode_tokens_per_s, out

    def run_hf() -> tuple[float, float, list[list[int]]]:
        timer = HFTimer()
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=args.new_tokens, min_length=0, streamer=timer)
        ttft, decode_s = timer.times[0] - timer.start, timer.times[-1] - timer.times[0]
        return ttft, (len(timer.times) - 1) / decode_s, out[:, args.prompt_len :].tolist()

    fns = {"lightning_tune": run_ours, "transformers": run_hf}
    runs: dict[str, list] = {name: [] for name in fns}
    floors: list[float] = []
    for i in range(args.runs + 1):  # run 0 is the warm-up (first-call allocations, kernel selection)
        for name, fn in fns.items():  # interleaved, so a burst of load on a shared machine hits both
            result = fn()
            if i:
                runs[name].append(result)
        if i:
            floors.append(matmul_floor_s(ours, args.batch))  # measured between runs too: the load changes
    results = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs), rs[0][2]) for name, rs in runs.items()}

    floor = statistics.median(floors)
    same = results["lightning_tune"][2] == results["transformers"][2]
    hf_ttft, hf_rate = results["transformers"][:2]
    print(
        f"Llama 2 shape: vocab {args.vocab}, dim {args.dim}, {args.layers} layers, {args.heads}/{kv_heads} heads, MLP {args.mlp}, "
        f"{args.dtype}; batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens; "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"median of {args.runs} runs after a warm-up"
    )
    print(f"{'':16}{'TTFT ms':>10}{'decode tok/s':>14}{'TTFT ratio':>12}{'decode ratio':>14}")
    for name, (ttft, rate, _) in results.items():
        print(f"{name:16}{ttft * 1e3:10.1f}{rate * args.batch:14.1f}{hf_ttft / ttft:12.2f}{rate / hf_rate:14.2f}")
    print(f"{'matmul floor':16}{'':10}{args.batch / floor:14.1f}{'':12}{1 / (floor * hf_rate):14.2f}   (linear layers alone, no attention or overhead)")
    print("decode tok/s counts every row of the batch; ratios are transformers' time over ours (higher is better for us)")
    print(f"identical greedy tokens: {'yes' if same else 'NO'}")
    print(f"peak RSS of this process (both models): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
