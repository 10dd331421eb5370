"""Fine-tune from a transformers-made checkpoint, then open the results in transformers and PEFT.

The exported adapter must load with `peft.PeftModel.from_pretrained` and the merged directory with
`transformers`, both giving the fine-tuned model's logits (fp32, relative error <= 1e-5); a notebook
drives the same classes as the CLI; the generate command prints what the model generates.
"""

import lightning.pytorch as pl
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_tune import InstructDataModule, LoRAFinetune, Tokenizer, from_pretrained
from lightning_tune.checkpoint import load_peft_adapter
from lightning_tune.cli import main
from lightning_tune.data.base import DEMO_TOKENIZER
from lightning_tune.generate import generate


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A random tiny Llama 2 saved by transformers itself, with the demo tokenizer beside it."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    path = tmp_path_factory.mktemp("hf_base")
    LlamaForCausalLM(config).save_pretrained(path)
    (path / "tokenizer.model").write_bytes(DEMO_TOKENIZER.read_bytes())
    return path


def fit_lora(hf_base, out_dir, steps: int = 4) -> LoRAFinetune:
    pl.seed_everything(0)
    module = LoRAFinetune(
        checkpoint_dir=str(hf_base),
        tokenizer_path=str(hf_base / "tokenizer.model"),
        lr=1e-2,
        warmup_steps=0,
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_attn_modules=["q_proj", "v_proj", "o_proj"],
        apply_lora_to_mlp=True,
    )
    data = InstructDataModule(source="demo", tokenizer_path=str(hf_base / "tokenizer.model"), max_seq_len=96, batch_size=4, cache_dir=str(out_dir / "cache"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=out_dir, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    return module


def test_notebook_lora_fit_exports_open_in_peft_and_transformers(hf_base, tmp_path):
    module = fit_lora(hf_base, tmp_path)
    module.model.eval()
    tokens = torch.randint(3, 512, (2, 17))
    with torch.no_grad():
        ours = module.model(tokens)

        base = AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32).eval()
        before = base(tokens).logits
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert rel_error(peft_model(tokens).logits, ours) <= 1e-5

        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        assert rel_error(merged(tokens).logits, ours) <= 1e-5

    assert rel_error(before, ours) > 1e-3, "training must have changed the model, or the test proves nothing"
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == DEMO_TOKENIZER.read_bytes()


def test_generate_from_adapter_equals_generate_from_merged(hf_base, tmp_path):
    fit_lora(hf_base, tmp_path)
    prompts = [[1, 5, 9, 33, 7], [1, 80, 102]]
    merged = from_pretrained(tmp_path / "merged")
    with_adapter = from_pretrained(hf_base)
    load_peft_adapter(with_adapter, tmp_path / "adapter")
    with_adapter.eval()
    assert generate(merged, prompts, 12) == generate(with_adapter, prompts, 12)


def test_generate_command_prints_transformers_greedy_output(hf_base, tmp_path, capsys):
    fit_lora(hf_base, tmp_path)
    tokenizer = Tokenizer(hf_base / "tokenizer.model")
    prompt = "Count from 2 to 6."
    assert main(["generate", "--checkpoint_dir", str(tmp_path / "merged"), "--prompt", prompt, "--max_new_tokens", "10"]) == 0
    printed = capsys.readouterr().out

    from lightning_tune.data.templates import get_template

    ids = tokenizer.encode(get_template("alpaca").format(prompt))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_id, pad_token_id=0)
    new = [i for i in out[0, len(ids) :].tolist() if i not in (tokenizer.eos_id, 0)]
    assert len(new) >= 3, "too few tokens to compare"
    assert printed.strip() == tokenizer.decode(new).strip()


def test_tiny_demo_learns_and_generates_what_it_learned(tmp_path, capsys):
    """The README's CPU demo, shortened: the loss falls clearly and the model answers in the
    trained format (capital letters for the uppercase task, counting starting at the given number)."""
    import csv

    run = tmp_path / "demo"
    assert (
        main(
            [
                "fit",
                "--config",
                "tiny_full.yaml",
                "--trainer.max_steps=300",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={run}",
                f"--trainer.logger.init_args.save_dir={run}",
                f"--trainer.callbacks.init_args.dirpath={run}/checkpoints",
                "--data.val_size=0",
                "--trainer.val_check_interval=null",
                "--trainer.limit_val_batches=0",
            ]
        )
        == 0
    )
    rows = [r for r in csv.DictReader(open(next(run.rglob("metrics.csv")))) if r.get("train_loss")]
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    assert last < 0.5 * first, (first, last)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Write the word in capital letters.", "input": "apple"}\n{"instruction": "Count from 3 to 9."}\n')
    capsys.readouterr()
    assert main(["generate", "--checkpoint_dir", str(run / "merged"), "--prompts_file", str(prompts), "--max_new_tokens", "16"]) == 0
    answers = [block.split("\n", 1)[1].strip() for block in capsys.readouterr().out.strip().split("### ")[1:]]
    assert answers[0] and answers[0].replace(" ", "").isupper(), answers
    assert answers[1].startswith("3 "), answers
