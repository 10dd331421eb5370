"""Shared by the preference recipes' TRL parity tests (ORPO, SimPO, KTO, reward model): the pairs, our
batch of them, LoRA weights set alike in both, and one TRL trainer step's logged metrics and gradients."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lightning_tune.layers.lora import lora_modules

# Pairs over the word-level tokenizer's words (tests/hf_helpers.py: w3 ... w95); completions of different
# lengths, so padding and the per-token averages matter. Completions start with a space: the prompt's text
# is followed directly by the completion's (template "none").
PAIRS = [
    {"prompt": "w3 w4 w5", "chosen": " w6 w7", "rejected": " w8 w9 w10 w11"},
    {"prompt": "w12 w13", "chosen": " w14 w15 w16", "rejected": " w17"},
    {"prompt": "w20 w21 w22 w23", "chosen": " w24", "rejected": " w25 w26"},
    {"prompt": "w30", "chosen": " w31 w32 w33 w34", "rejected": " w35 w36 w37"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def set_lora(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """Nonzero A and B in every adapter of our model (B = 0 would leave it the base); returns them by our names."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, layer in lora_modules(model).items():
            for part in ("lora_A", "lora_B"):
                weight = getattr(layer, part).weight
                weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
                values[f"{name}.{part}"] = weight.detach().clone()
    return values


def lora_grads(model) -> dict[str, torch.Tensor]:
    """Our adapters' gradients by the names `set_lora` returns."""
    return {f"{name}.{part}": getattr(layer, part).weight.grad for name, layer in lora_modules(model).items() for part in ("lora_A", "lora_B")}


def peft_name(name: str) -> str:
    """PEFT's parameter name (base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight) as ours."""
    return name.removeprefix("base_model.model.").replace(".default.weight", "")


def trl_step(
    trainer_cls, config_cls, records: list[dict], base: Path, tmp_path: Path, lora: dict[str, torch.Tensor] | None, metric: str, policy_state: dict | None = None, **config
) -> tuple[dict, dict[str, torch.Tensor]]:
    """One step (learning rate 0, no clipping, fp32) of a TRL trainer on `records`: the logged entry
    holding `metric`, and every gradient by our names (LoRA: `lora`'s A and B copied in first; None: full).
    `policy_state`: full tuning from these weights, with the unchanged base as TRL's `ref_model`.

    `prompt` gets "<bos> " written in front: TRL tokenizes prompt and completion apart and appends EOS,
    and this tokenizer adds no BOS itself, so the ids are then ours (BOS + prompt + completion + EOS)."""
    import datasets
    import transformers
    from peft import LoraConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    extra = {}
    if policy_state is not None:
        model.load_state_dict(policy_state, strict=False)  # a tied head is one tensor in both
        extra["ref_model"] = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    grads: dict[str, torch.Tensor] = {}

    class Grab(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({peft_name(name): p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})

    args = config_cls(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(records), max_steps=1, learning_rate=0.0, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", seed=0, max_grad_norm=0.0, gradient_checkpointing=False, bf16=False, **config,
    )  # fmt: skip
    train = datasets.Dataset.from_list([{**record, "prompt": "<bos> " + record["prompt"]} for record in records])
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]) if lora is not None else None
    trainer = trainer_cls(model=model, args=args, train_dataset=train, processing_class=transformers.AutoTokenizer.from_pretrained(base), peft_config=peft_config, callbacks=[Grab()], **extra)
    if lora is not None:
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if "lora_" in name:
                    param.copy_(lora[peft_name(name)])
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if metric in entry)
    return logged, grads


def assert_close_metrics(ours: dict[str, torch.Tensor], logged: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for key, value in ours.items():
        torch.testing.assert_close(torch.as_tensor(value).double(), torch.tensor(logged[key], dtype=torch.float64), rtol=rtol, atol=atol, msg=key)


def assert_close_grads(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Each gradient within 1e-5 relative to its own size or to the tensor's largest entry (the project's
    fp32 bar): an entry is a sum over the batch of products that may cancel, so its float32 error (a few
    ulps of those terms, ~1e-6 of the largest here) scales with the terms, not with the entry."""
    assert ours and ours.keys() <= theirs.keys(), sorted(set(ours) - set(theirs))[:3]
    for name, grad in ours.items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grad, theirs[name], rtol=1e-5, atol=max(1e-6, 1e-5 * scale), msg=name)


# Pairs whose rows (prompt + completion, either side) are all one length: no padding, where TRL's logits/*
# (means over every position, padding included, which TRL runs with an attention mask and we without) are ours.
UNPADDED_PAIRS = [
    {"prompt": "w3 w4", "chosen": " w6 w7", "rejected": " w8 w9"},
    {"prompt": "w12 w13", "chosen": " w14 w15", "rejected": " w17 w18"},
]
