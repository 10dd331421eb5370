"""Full fine-tuning: every parameter of the model trains."""

from __future__ import annotations

from lightning_tune.modules.base import FinetuneModule


class FullFinetune(FinetuneModule):
    """Fine-tune all weights of a Llama 2 model; exports a Hugging Face directory to `merged/`.

    Args:
        model: Model size (llama2_7b, llama2_13b, llama2_70b, tiny_llama2); null to take the
            architecture from checkpoint_dir.
        model_args: Overrides of the size's fields (vocab_size, num_layers, embed_dim, ...); only
            without a checkpoint (random init, for demos and tests).
        checkpoint_dir: Hugging Face or Meta checkpoint directory to start from; null = random init.
        tokenizer_path: SentencePiece tokenizer, copied into the exports (linked from data).
        max_seq_len: Longest training sequence (linked from data); checked against the model.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to norm weights).
        betas: AdamW betas.
        warmup_steps: Linear warm-up steps before the cosine decay.
        activation_checkpointing: Recompute each layer in backward to save activation memory.
        export: Write the exports into the trainer's default_root_dir when fit ends.
        loss_chunk_size: Run the output head and cross-entropy this many labelled positions at a
            time, so the [tokens, vocab] logits never exist at once; 0 = in one piece. Same loss
            and gradients either way.
        compile: torch.compile each decoder layer; the first steps are slow (compilation).
    """

    def __init__(
        self,
        model: str | None = None,
        model_args: dict[str, int | float] | None = None,
        checkpoint_dir: str | None = None,
        tokenizer_path: str | None = None,
        max_seq_len: int | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        activation_checkpointing: bool = False,
        export: bool = True,
        loss_chunk_size: int = 1024,
        compile: bool = False,
    ) -> None:
        super().__init__(model, model_args, checkpoint_dir, tokenizer_path, max_seq_len, lr, weight_decay, betas, warmup_steps, activation_checkpointing, export, loss_chunk_size, compile)
        self.save_hyperparameters()
