# %% [markdown]
# # LoRA fine-tuning from Python, in a notebook
#
# The same recipe as `python -m lightning_tune fit --config tiny_lora.yaml`, built by hand: a tiny
# random-init Llama 2 with LoRA adapters learns the bundled demo instructions on a CPU, exports a
# Hugging Face directory, and generates. For a real Llama 2, set `model_name=None,
# checkpoint_dir="checkpoints/meta-llama/Llama-2-7b-hf"` (see `python -m lightning_tune download`),
# `source="tatsu-lab/alpaca"` and the checkpoint's `tokenizer.model`, and train on a GPU.
#
# Open it as a notebook (VS Code, Jupyter with jupytext) or run it: `python examples/notebook_lora.py`.
# `LIGHTNING_TUNE_EXAMPLE_STEPS` sets the number of training steps (the test suite uses a few).

# %%
import os
import tempfile
from pathlib import Path

import lightning

import lightning_tune
from lightning_tune.data.templates import get_template
from lightning_tune.generate import generate_text

MAX_STEPS = int(os.environ.get("LIGHTNING_TUNE_EXAMPLE_STEPS", "300"))
OUT = Path(os.environ.get("LIGHTNING_TUNE_EXAMPLE_OUT", tempfile.mkdtemp(prefix="notebook_lora_")))
lightning.seed_everything(42)

# %% [markdown]
# ## Data and recipe
# `source="demo"` is the bundled demo data with its own small tokenizer (512 pieces), so no download.

# %%
data = lightning_tune.InstructDataModule(source="demo", max_seq_len=128, batch_size=16, val_size=64)
recipe = lightning_tune.LoRAFinetune(
    model_name="tiny_llama2",
    model_args={"vocab_size": 512},  # the demo tokenizer's vocabulary
    tokenizer_path=data.tokenizer_path,
    max_seq_len=data.max_seq_len,
    lr=3e-3,
    warmup_steps=min(20, MAX_STEPS // 2),
    lora_rank=16,
    lora_alpha=32,
    lora_dropout=0.0,
    lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    apply_lora_to_mlp=True,
    apply_lora_to_output=True,
)

# %% [markdown]
# ## Train
# Lightning's `Trainer` does the loop; when `fit` ends the recipe exports `adapter/` (PEFT) and
# `merged/` (transformers) into `default_root_dir`.

# %%
trainer = lightning.Trainer(
    accelerator="cpu",
    devices=1,
    max_steps=MAX_STEPS,
    default_root_dir=str(OUT),
    log_every_n_steps=min(20, MAX_STEPS),
    val_check_interval=min(100, MAX_STEPS),
    check_val_every_n_epoch=None,
    enable_checkpointing=False,
)
trainer.fit(recipe, datamodule=data)
print("exported:", sorted(p.name for p in OUT.iterdir()))

# %% [markdown]
# ## Load the export and generate
# `merged/` is a plain Hugging Face directory: `lightning_tune.from_pretrained` (or transformers) loads it.

# %%
model = lightning_tune.from_pretrained(OUT / "merged")
tokenizer = lightning_tune.Tokenizer(str(OUT / "merged" / "tokenizer.model"))
prompt = get_template("alpaca").format("Add 3 and 4.")
text, stats = generate_text(model, tokenizer, prompt, max_new_tokens=32, stream=False)
print(f"Add 3 and 4. -> {text!r}")
print(f"time to first token {stats.prefill_s * 1000:.0f} ms")
