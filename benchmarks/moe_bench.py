"""A mixture-of-experts LoRA training step: lightning_tune's recipe against the transformers + PEFT loop, same work.

Workload: a small Qwen3-MoE shape (random init, seed 0, saved once as a Hugging Face checkpoint that both rows
load): vocab 32000, dim 512, 4 layers, 8 query / 4 key-value heads of 64, 32 experts of 256 per layer, 4 per
token, renormalised, load-balancing loss coefficient 0.001. Data: random token rows (seed 0), batch 4 x 256,
every position labelled (the step's speed does not depend on what the tokens say). LoRA r 16, alpha 32, no
dropout on q, k, v, o and on every expert (ours: `apply_lora_to_experts`; PEFT: `target_parameters` on
`mlp.experts.gate_up_proj` / `down_proj`, the form PEFT documents for transformers 5's stacked experts). AdamW
lr 1e-4, constant, fp32. Both rows add the load-balancing loss to the loss (transformers with
`output_router_logits=True`), so their first-step losses must agree (checked).

Rows, each in its own subprocess (its own peak memory), interleaved and repeated `--repeats` times, each
step's time the fastest repeat:
- `plain`: transformers' `Qwen3MoeForCausalLM` with its default experts implementation (`grouped_mm`: tokens
  sorted by expert, `torch._grouped_mm`, as ours) + PEFT, `model(input_ids, labels=...).loss`, backward, step.
- `plain-eager`: the same with `experts_implementation="eager"`, the loop in Python over the experts hit (what
  transformers 4 ran, and what 5 falls back to where grouped_mm cannot dispatch).
- `ours`: `LoRAFinetune` through a real `lightning.Trainer` (logging, checkpointing, progress bar off):
  sorted (token, expert) rows and grouped matmuls (`model/moe.py`).

Reported: median step time over steps 3..N, tokens/s, peak RSS, MFU against the measured fp32 matmul peak
(square 1024 / 2048 products), and the CPU's name and flags. MFU counts the matmuls a LoRA step does, per
token: attention projections and the k chosen experts forward and for the input gradients (2 x 2 x
params), the adapters also for their weight gradients (3 x 2 x params), the router forward and input
gradient, the head forward and input gradient, and the attention scores (4 x T x layers x heads x head_dim
forward, twice that backward) over the average row.

    python benchmarks/moe_bench.py                    # ~4 minutes on 2 quiet cores
    python benchmarks/moe_bench.py --steps 6 --repeats 1

Needs transformers and peft (in a checkout: pip install -e '.[test]'). Run with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from grpo_bench import cpu_summary, matmul_peak_fp32  # the same peak and CPU line as the GRPO table (this folder is on sys.path)

SHAPE = dict(vocab_size=32000, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64, embed_dim=512, intermediate_dim=1024, moe_intermediate_dim=256, num_experts=32, num_experts_per_tok=4)
BATCH, SEQ, RANK, ALPHA, LR = 4, 256, 16, 32.0, 1e-4


def make_checkpoint(directory: Path) -> Path:
    from lightning_tune.checkpoint import save_hf_checkpoint
    from lightning_tune.families import model_config
    from lightning_tune.model import CausalLM

    path = directory / "tiny_moe_bench"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        model = CausalLM(model_config("tiny_qwen3_moe", **SHAPE))
        model.init_weights(std=0.02)
        save_hf_checkpoint(model, model.config, path)
    return path


def batches(steps: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, SHAPE["vocab_size"], (BATCH, SEQ), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def run_ours(path: Path, steps: int) -> tuple[list[float], float]:
    import lightning
    from torch.utils.data import DataLoader

    from lightning_tune.recipes.sft import LoRAFinetune

    module = LoRAFinetune(
        checkpoint_dir=str(path),
        lr=LR,
        lr_schedule="constant",
        warmup_steps=0,
        export=False,
        lora_rank=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        apply_lora_to_experts=True,
    )
    starts: list[float] = []
    first: list[float] = []

    class StepTimer(lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:  # the returned loss: summed cross-entropy + coef * aux * tokens
                first.append(float(outputs["loss"]) / int((batch["labels"][:, 1:] != -100).sum()))
            if trainer.global_step == steps:
                starts.append(time.perf_counter())

    trainer = lightning.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[StepTimer()],
    )
    torch.manual_seed(0)
    trainer.fit(module, DataLoader(batches(steps), batch_size=None))
    return [b - a for a, b in zip(starts, starts[1:])], first[0]


def run_plain(path: Path, steps: int, experts: str = "grouped_mm") -> tuple[list[float], float]:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_router_logits=True, experts_implementation=experts)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    )
    model = peft.get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    times, first = [], None
    for step, batch in enumerate(batches(steps)):
        start = time.perf_counter()
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if step == 0:
            first = out.loss.item()
        del out
    return times, first


def worker(row: str, path: Path, steps: int) -> None:
    torch.manual_seed(0)
    if row == "ours":
        times, first = run_ours(path, steps)
    else:
        times, first = run_plain(path, steps, "eager" if row == "plain-eager" else "grouped_mm")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (KiB on Linux)
    print("RESULT " + json.dumps({"times": times, "first_loss": first, "peak_gib": peak}))


def step_flops() -> float:
    """Matmul FLOPs of one LoRA step (see the module docstring)."""
    E, L, k = SHAPE["embed_dim"], SHAPE["num_layers"], SHAPE["num_experts_per_tok"]
    H, K, D, I, X, V = SHAPE["num_heads"], SHAPE["num_kv_heads"], SHAPE["head_dim"], SHAPE["moe_intermediate_dim"], SHAPE["num_experts"], SHAPE["vocab_size"]
    tokens = BATCH * SEQ
    attention = E * (H * D) * 2 + E * (K * D) * 2  # q, o and k, v
    experts = k * 3 * E * I  # the chosen experts' gate, up, down
    frozen = L * (attention + experts + X * E) + V * E  # + router, head
    adapters = L * (RANK * (E + H * D) * 2 + RANK * (E + K * D) * 2 + k * RANK * ((E + 2 * I) + (I + E)))
    scores = 4 * SEQ * L * H * D  # q k^T and p v per token, forward
    return tokens * (2 * 2 * frozen + 3 * 2 * adapters + 3 * scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "lightning_tune_moe_bench")
    parser.add_argument("--worker", choices=["ours", "plain", "plain-eager"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    path = make_checkpoint(args.cache_dir)
    if args.worker:
        worker(args.worker, path, args.steps)
        return
    runs: dict[str, list[dict]] = {"plain-eager": [], "plain": [], "ours": []}
    peak = matmul_peak_fp32()
    for _ in range(args.repeats):
        for row in runs:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", row, "--steps", str(args.steps), "--cache-dir", str(args.cache_dir)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            if proc.returncode:
                sys.exit(f"{row}: {proc.stderr[-2000:]}")
            runs[row].append(json.loads(proc.stdout.split("RESULT ")[-1]))
        peak = max(peak, matmul_peak_fp32())
    print(f"# {cpu_summary()}; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; torch {torch.__version__}")
    print(f"# Qwen3-MoE shape {SHAPE}, batch {BATCH} x {SEQ}, LoRA r {RANK} on q, k, v, o and every expert, AdamW, fp32; steps 3..{args.steps}, best of {args.repeats}")
    print("| row | step time (s) | tokens/s | peak RSS (GiB) | MFU | first-step loss |")
    print("|---|---|---|---|---|---|")
    flops = step_flops()
    losses = {}
    for row, results in runs.items():
        best = [min(r["times"][i] for r in results) for i in range(args.steps)]
        step = statistics.median(best[2:])
        losses[row] = results[0]["first_loss"]
        print(f"| {row} | {step:.3f} | {BATCH * SEQ / step:.0f} | {min(r['peak_gib'] for r in results):.2f} | {100 * flops / step / peak:.1f}% | {losses[row]:.6f} |")
    # Same weights, same batch: the losses differ only by fp32 rounding of sums over ~1e3 tokens and ~1e4 logits (n * 2^-24 relative)
    assert all(abs(loss - losses["plain"]) <= 1e-4 * abs(losses["plain"]) for loss in losses.values()), losses


if __name__ == "__main__":
    main()
