"""Training step speed and memory of lightning_tune's recipes vs a plain transformers + PEFT loop.

The workload of issue 7: a Llama 2 shaped model (default vocab 32000, dim 512, 8 layers, 8 heads,
MLP 1376: 58 M parameters, random init), the 100 Alpaca records of ../shared/assets/alpaca_tiny.json
with the real Llama 2 tokenizer, Alpaca template, prompt masked, batch 4 right-padded to the longest
in the batch, LoRA r 8 / alpha 16 / dropout 0.05 on q_proj and v_proj, AdamW.

Every configuration runs in a fresh subprocess (so peak RSS is its own), configurations are
interleaved and the whole set repeated `--repeats` times (a shared machine's load drifts), and each
step's time is its fastest repeat (the same batch each repeat; load only ever slows a step down). Step time is the wall time from one batch's
start to the next (data loading, hooks and the optimiser step included): ours through a real
`lightning.Trainer` (logging, progress bar, checkpointing off), theirs a hand-written loop over the
same batches in the same order. Reported: median step time over steps 4..N, non-pad tokens/s
(sum over steps 4..N), peak RSS, model FLOPs utilisation (MFU) against a matmul peak measured here
between runs, and the plain loop's step time over ours.

    python benchmarks/train_bench.py                       # the issue's table (fp32, LoRA and full, bf16 rows)
    python benchmarks/train_bench.py --steps 25 --repeats 3
    python benchmarks/train_bench.py --size llama2_7b --layers 2 --steps 6   # a larger Llama 2 shape
    python benchmarks/train_bench.py --profile ours-lora   # torch.profiler table of steps 4..6, one config

Needs transformers and peft (pip install 'lightning_tune[test]'). torchtune / litgpt rows are not
run here; they are listed as skipped when those packages are absent.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
ASSETS = ROOT.parent / "shared" / "assets"

# name -> (recipe, implementation, precision, group_by_length, pack). "ours-*" rows use the recipe's
# defaults (packed batches) unless named "-padded" (right-padded, as the plain loop) or "-grouped"
# (right-padded, length-grouped).
CONFIGS: dict[str, tuple[str, str, str, bool, bool]] = {
    "plain-lora": ("lora", "plain", "32-true", False, False),
    "ours-lora": ("lora", "ours", "32-true", False, True),
    "ours-lora-padded": ("lora", "ours", "32-true", False, False),
    "ours-lora-grouped": ("lora", "ours", "32-true", True, False),
    "ours-lora-bf16-mixed": ("lora", "ours", "bf16-mixed", False, True),
    "ours-lora-bf16-true": ("lora", "ours", "bf16-true", False, True),
    "plain-full": ("full", "plain", "32-true", False, False),
    "ours-full": ("full", "ours", "32-true", False, True),
    "ours-full-padded": ("full", "ours", "32-true", False, False),
    "ours-full-grouped": ("full", "ours", "32-true", True, False),
}
# The model; a --size picks a Llama 2 shape instead (with --layers to keep it CPU-sized).
BENCH_SHAPE = dict(vocab_size=32000, num_layers=8, num_heads=8, num_kv_heads=8, embed_dim=512, intermediate_dim=1376, max_seq_len=4096)
LORA = dict(rank=8, alpha=16.0, dropout=0.05, targets=["q_proj", "v_proj"])
LR = {"lora": 3e-4, "full": 2e-5}


def shape(args: argparse.Namespace) -> dict:
    if args.size == "bench58m":
        cfg = dict(BENCH_SHAPE)
    else:
        from lightning_tune.model import llama2_config

        cfg = llama2_config(args.size).to_dict()
        cfg.pop("norm_eps"), cfg.pop("rope_base")
    if args.layers:
        cfg["num_layers"] = args.layers
    return cfg


# ---- workers (one configuration, one fresh process) ---------------------------------------------


def data_module(args: argparse.Namespace, group_by_length: bool, pack: bool = False):
    from lightning_tune.data import InstructDataModule

    # shuffle=False: every ungrouped run sees the same batches in file order.
    return InstructDataModule(
        source=str(args.data),
        tokenizer_path=str(args.tokenizer),
        max_seq_len=2048,
        batch_size=args.batch,
        shuffle=group_by_length,
        group_by_length=group_by_length,
        pack=pack,
        seed=0,
        cache_dir=str(args.cache_dir),
    )


def profiler_for(args: argparse.Namespace):
    from torch.profiler import ProfilerActivity, profile, schedule

    return profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=3, warmup=0, active=3, repeat=1), record_shapes=False)


def run_ours(args: argparse.Namespace, recipe: str, precision: str, grouped: bool, pack: bool) -> tuple[list[float], list[int]]:
    import lightning

    from lightning_tune.modules.full import FullFinetune
    from lightning_tune.modules.lora import LoRAFinetune

    cfg = shape(args)
    common = dict(model="llama2_7b", model_args=cfg, tokenizer_path=str(args.tokenizer), lr=LR[recipe], weight_decay=0.01, betas=(0.9, 0.999), warmup_steps=0, export=False)
    if recipe == "lora":
        module = LoRAFinetune(**common, lora_rank=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], lora_attn_modules=LORA["targets"], compile=args.compile)
    else:
        module = FullFinetune(**common, compile=args.compile)
    starts: list[float] = []
    tokens: list[int] = []
    prof = profiler_for(args) if args.profile else None

    class StepTimer(lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            starts.append(time.perf_counter())
            tokens.append(int((batch["input_ids"] != 0).sum()))  # pad id 0 (<unk>) never occurs in text

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if prof is not None:
                prof.step()

        def on_train_end(self, trainer, pl_module):
            starts.append(time.perf_counter())

    trainer = lightning.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StepTimer()],
        default_root_dir=str(args.cache_dir / "runs"),
    )
    torch.manual_seed(0)
    if prof is not None:
        prof.start()
    trainer.fit(module, datamodule=data_module(args, grouped, pack))
    if prof is not None:
        prof.stop()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    return [b - a for a, b in zip(starts, starts[1:])], tokens


def run_plain(args: argparse.Namespace, recipe: str) -> tuple[list[float], list[int]]:
    """What one writes by hand with transformers + PEFT: model(input_ids, attention_mask, labels).loss."""
    from functools import partial

    import transformers
    from torch.utils.data import DataLoader

    from lightning_tune.data import collate

    cfg = shape(args)
    config = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["embed_dim"],
        intermediate_size=cfg["intermediate_dim"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_kv_heads"],
        max_position_embeddings=cfg["max_seq_len"],
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if recipe == "lora":
        import peft

        lora = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA["targets"], task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR[recipe], weight_decay=0.01)
    dm = data_module(args, False)
    dm.setup("fit")
    loader = DataLoader(dm.train_dataset, batch_size=args.batch, shuffle=False, collate_fn=partial(collate, pad_id=0))
    starts: list[float] = []
    tokens: list[int] = []
    prof = profiler_for(args) if args.profile else None
    if prof is not None:
        prof.start()
    for step, batch in enumerate(loader):
        if step == args.steps:
            break
        starts.append(time.perf_counter())
        attention_mask = batch["input_ids"] != 0
        tokens.append(int(attention_mask.sum()))
        loss = model(input_ids=batch["input_ids"], attention_mask=attention_mask, labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if prof is not None:
            prof.step()
    starts.append(time.perf_counter())
    if prof is not None:
        prof.stop()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    return [b - a for a, b in zip(starts, starts[1:])], tokens


def worker(args: argparse.Namespace) -> None:
    recipe, impl, precision, grouped, pack = CONFIGS[args.worker]
    if args.threads:
        torch.set_num_threads(args.threads)
    times, tokens = run_ours(args, recipe, precision, grouped, pack) if impl == "ours" else run_plain(args, recipe)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print("RESULT " + json.dumps({"times": times, "tokens": tokens, "rss_gib": rss_gib}))


# ---- parent: interleave, measure the matmul peak, tabulate ------------------------------------


def matmul_peak_flops(dtype: torch.dtype, repeats: int = 5) -> float:
    """Best FLOP/s of square matmuls (n = 1024, 2048) in `dtype`: the peak MFU is measured against.

    The best of several tries, taken again between runs and maximised over the whole benchmark,
    because other processes on a shared machine only ever make a measurement slower.
    """
    best_rate = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best_rate = max(best_rate, 2 * n**3 / (time.perf_counter() - start))
    return best_rate


def model_flops(cfg: dict, recipe: str, samples: list[tuple[int, int]]) -> float:
    """FLOPs a step needs, counting only real work: the body on non-pad tokens, the head on labelled ones.

    Per token, a linear layer of P weights costs 2P forward, 2P for the input gradient and (full
    fine-tuning only) 2P for the weight gradient; attention adds 4 * T * E per layer per token
    forward (QK^T and AV over T keys, causal halves it to about 2 * T * E) and twice that backward.
    The same count is used for every row, so MFU ratios equal throughput ratios.
    """
    E, F, L, V = cfg["embed_dim"], cfg["intermediate_dim"], cfg["num_layers"], cfg["vocab_size"]
    kv = E // cfg["num_heads"] * cfg["num_kv_heads"]
    body = L * (2 * E * E + 2 * E * kv + 3 * E * F)
    passes = 3 if recipe == "full" else 2  # forward + input grad (+ weight grad)
    total = 0.0
    for length, labelled in samples:
        total += passes * 2 * body * length + 3 * L * 2 * length * length * E  # attention: ~2TE per token fwd, x3 with backward
        total += passes * 2 * E * V * labelled
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="bench58m", choices=["bench58m", "tiny_llama2", "llama2_7b", "llama2_13b", "llama2_70b"], help="bench58m: the issue's 58M model")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (larger sizes on a CPU)")
    parser.add_argument("--steps", type=int, default=16, help="N: steps per run; figures are over steps 4..N")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all configurations")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="our rows with compile=True (slow first steps)")
    parser.add_argument("--profile", default=None, help="profile one configuration (steps 4..6) and print the op table")
    parser.add_argument("--data", type=Path, default=ASSETS / "alpaca_tiny.json")
    parser.add_argument("--tokenizer", type=Path, default=ASSETS / "llama2_tokenizer.model")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/lightning_tune_train_bench"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be at least 4 (figures are over steps 4..N)")
    for path in (args.data, args.tokenizer):
        if not path.is_file():
            parser.error(f"{path}: not found (the Alpaca records and Llama 2 tokenizer live in ../shared/assets)")
    if args.worker:
        worker(args)
        return
    if args.profile:
        args.worker = args.profile
        worker(args)
        return
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; expected some of {list(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    forward = [a for a in sys.argv[1:]]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    peaks = {"fp32": 0.0, "bf16": 0.0}
    for round_ in range(args.repeats):
        for name in names:  # interleaved, so a burst of load on the shared machine hits every row
            out = subprocess.run([sys.executable, __file__, *forward, "--worker", name], capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"{name}: worker failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(lines[-1][7:]))
            print(f"round {round_ + 1}/{args.repeats} {name}: median step {statistics.median(runs[name][-1]['times'][3:]):.3f} s", file=sys.stderr)
            peaks["fp32"] = max(peaks["fp32"], matmul_peak_flops(torch.float32))
            peaks["bf16"] = max(peaks["bf16"], matmul_peak_flops(torch.bfloat16))

    # Sample lengths and labelled counts per step, for the FLOP count (same data as the workers).
    dm = data_module(args, False)
    dm.setup("fit")
    cfg = shape(args)
    per_sample = [(len(ids), sum(1 for x in labels[1:] if x != -100)) for ids, labels in zip(dm.train_dataset["input_ids"], dm.train_dataset["labels"])]

    rows = {}
    flops_per_token = {recipe: model_flops(cfg, recipe, per_sample) / sum(n for n, _ in per_sample) for recipe in ("lora", "full")}
    for name in names:
        recipe, impl, precision, grouped, _ = CONFIGS[name]
        # Every repeat of a configuration trains on the same batches, so step s of each repeat is the
        # same work: the fastest repeat of each step is its least-disturbed measurement.
        best = [min(run["times"][s] for run in runs[name]) for s in range(3, len(runs[name][0]["times"]))]  # steps 4..N
        tokens = runs[name][0]["tokens"][3:]
        rate = sum(tokens) / sum(best)
        run_rates = [sum(run["tokens"][3:]) / sum(run["times"][3:]) for run in runs[name]]
        peak = peaks["bf16"] if precision.startswith("bf16") else peaks["fp32"]
        rows[name] = dict(
            recipe=recipe,
            step=statistics.median(best),
            rate=rate,
            run_rate=statistics.median(run_rates),
            rss=statistics.median(run["rss_gib"] for run in runs[name]),
            mfu=flops_per_token[recipe] * rate / peak,
        )

    transformers_version = peft_version = "?"
    try:
        import peft
        import transformers

        transformers_version, peft_version = transformers.__version__, peft.__version__
    except ImportError:
        pass
    print(
        f"{datetime.date.today()} {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers_version}, peft {peft_version}; "
        f"shape {cfg}; batch {args.batch}; steps 4..{args.steps}; fastest of {args.repeats} interleaved runs per step; "
        f"matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s"
    )
    print(f"| {'configuration':22} | step time | non-pad tok/s | tok/s, median run | peak RSS | MFU | tok/s vs plain | RSS vs plain |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        base = rows.get(f"plain-{r['recipe']}")
        ratio = f"{r['rate'] / base['rate']:.2f}x" if base else "-"
        rss_ratio = f"{r['rss'] / base['rss']:.2f}x" if base else "-"
        print(f"| {name:22} | {r['step']:.3f} s | {r['rate']:.0f} | {r['run_rate']:.0f} | {r['rss']:.2f} GiB | {r['mfu'] * 100:.1f}% | {ratio} | {rss_ratio} |")
    print(
        "step time: median over steps 4..N of each step's fastest repeat; non-pad tok/s: their tokens over their summed time;"
        " tok/s, median run: the median over repeats of each run's own tok/s (shows the noise); peak RSS: median over repeats;"
        " MFU: model FLOPs (body on non-pad tokens, head on labelled ones) per second over the measured matmul peak of the row's dtype"
    )
    missing = [n for n in ("torchtune", "litgpt") if importlib.util.find_spec(n) is None]
    if missing:
        print(f"not installed, rows skipped: {', '.join(missing)}")


if __name__ == "__main__":
    main()
