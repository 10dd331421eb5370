"""What every recipe shares: building the model, the loss, the optimiser, logging, exports.

The recipes (`FullFinetune`, `LoRAFinetune`, `DPOFinetune`) subclass `FinetuneModule` once and add
their parameters and objective; which weights train and what is exported is their tuning's
(`recipes/tuning.py`: `Full` or `LoRA`), which the base delegates to. Lightning's `Trainer` does
everything else (devices, precision, gradient accumulation and clipping, checkpoints, loggers,
distribution).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_tune.checkpoint import load_config, load_weights, save_hf_checkpoint
from lightning_tune.data.collate import IGNORE_INDEX, label_index
from lightning_tune.families import SIZES, ModelConfig, model_config
from lightning_tune.hardware import warn_if_bf16_emulated
from lightning_tune.io.paths import resolve_path
from lightning_tune.layers.lora import store_frozen_linears_
from lightning_tune.model import CausalLM
from lightning_tune.recipes.tuning import Full, Tuning
from lightning_tune.tokenizer import load_tokenizer
from lightning_tune.training.loss import head_cross_entropy_sum
from lightning_tune.training.memory import peak_memory_gib
from lightning_tune.training.optim import LRSchedule, check_optimizer, lr_multiplier, optimizer_class, optimizer_kwargs, param_groups, with_fused_default
from lightning_tune.training.sharding import build_sharded, gather_state_dict

log = logging.getLogger(__name__)


def check_path(key: str, path: str | None, kind: str) -> None:
    """Fail at construction, not an hour later, when a configured path does not exist (pkg://PACKAGE/FILE: in an installed package)."""
    if path is not None and not resolve_path(path).exists():
        raise ValueError(f"{key}: {kind} {path!r} does not exist")


CHAT_TEMPLATE_KEY = "lightning_tune_chat_template"  # in a fit's .ckpt: the chat template its data used


class TokenMeanGradients(pl.Callback):
    """Turns the step's accumulated gradients into per-token means (`FinetuneModule.scale_gradients`)
    in `on_before_optimizer_step`. The recipe puts it first among the trainer's callbacks, because
    Lightning runs every callback's `on_before_optimizer_step` before the module's own: a user's
    callback that logs or inspects gradients there then sees the gradients the optimiser steps with."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        pl_module.scale_gradients()


class CheckpointMismatchError(ValueError):
    """A checkpoint saved with other shape-deciding settings than the run resuming it; one line."""


class FinetuneModule(pl.LightningModule):
    """Base of the fine-tuning recipes (`FullFinetune`, `LoRAFinetune`, `DPOFinetune`): the parameters they share.

    A recipe declares only its own parameters and changed defaults and passes the rest on with
    `**kwargs`; jsonargparse follows `super().__init__(**kwargs)` to these parameters and their
    docstrings, and `save_hyperparameters` here records them all (the recipe's own included).
    Every weight trains (`self.tuning` is `Full()`) unless the recipe sets another tuning.

    Args:
        model_name: A named size of any family in lightning_tune.families (llama2_7b, llama3_1_8b,
            qwen3_0_6b, mistral_7b_v0_3, smollm2_135m, tiny_llama2, ...); null to take the
            architecture from checkpoint_dir.
        model_args: Overrides of the size's fields (vocab_size, num_layers, embed_dim, ...); only
            without a checkpoint (random init, for demos and tests).
        checkpoint_dir: Hugging Face or Meta checkpoint directory to start from; null = random init.
        tokenizer_path: Tokenizer, copied into the exports (linked from data).
        max_seq_len: Longest training sequence (linked from data); checked against the model's
            context length when the recipe is built.
        optimizer: Optimiser class: an import path (torch.optim.AdamW, torch.optim.SGD,
            bitsandbytes.optim.AdamW8bit, or any torch.optim.Optimizer) or a torch.optim name (SGD).
        optimizer_args: More keyword arguments of the optimiser, e.g. {momentum: 0.9}; lr,
            weight_decay and betas are the parameters below. torch's Adam and AdamW run fused
            (one kernel per step) on unsharded CPU/CUDA parameters unless fused or foreach is given.
        lr: Peak learning rate.
        weight_decay: Weight decay of the matrices; norm weights and biases are never decayed.
        betas: Adam betas, given to optimisers that take betas (the Adam family).
        lr_schedule: Learning rate after the warm-up: cosine or linear decay to min_lr_ratio x lr at
            the last step, or constant; stepped once per optimiser step.
        warmup_steps: Optimiser steps of linear warm-up from 0 to lr.
        min_lr_ratio: Learning rate at the end of a cosine or linear decay, as a fraction of lr.
        activation_checkpointing: Recompute each layer in backward to save activation memory.
        export: Write the exports into the trainer's default_root_dir when fit ends.
        loss_chunk_size: Run the output head and cross-entropy this many labelled positions at a
            time, so the [tokens, vocab] logits never exist at once; 0 = in one piece. Same loss
            and gradients either way.
        compile: torch.compile each decoder layer; the first steps are slow (compilation).
        model: Deprecated spelling of model_name (older configs and checkpoints); read with a warning.
    """

    # Hyper-parameters that decide the saved parameters' shapes (or meaning): a checkpoint resumes only
    # a run with the same values (`on_load_checkpoint`). Recipes add their own; the tuning adds its
    # (`Tuning.checkpoint_keys`).
    CHECKPOINT_KEYS: tuple[str, ...] = ("model_name", "model_args")
    DATA_MODULES: tuple[type, ...] | None = None  # the data modules whose batches the recipe trains on; None: any

    def __init__(
        self,
        model_name: str | None = None,
        model_args: dict[str, int | float] | None = None,
        checkpoint_dir: str | None = None,
        tokenizer_path: str | None = None,
        max_seq_len: int | None = None,
        optimizer: str = "torch.optim.AdamW",
        optimizer_args: dict[str, Any] | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_schedule: LRSchedule = "cosine",
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        activation_checkpointing: bool = False,
        export: bool = True,
        loss_chunk_size: int = 1024,
        compile: bool = False,
        model: str | None = None,
    ) -> None:
        super().__init__()
        if model is not None:  # the old spelling: `model` is the module (self.model), the size is model_name
            if model_name is not None and model_name != model:
                raise ValueError(f"model: is the old name of model_name; give one of them, not model: {model!r} and model_name: {model_name!r}")
            log.warning("model: is deprecated, write model_name: %s (the size's name; the module is self.model)", model)
            model_name = model
        if model_name is None and checkpoint_dir is None:
            raise ValueError("model_name: give a model size (one of " + ", ".join(SIZES) + ") or a checkpoint_dir to read the architecture from")
        if model_name is not None and model_name not in SIZES:
            raise ValueError(f"model_name: unknown model {model_name!r}; expected one of {', '.join(SIZES)}")
        if model_args and checkpoint_dir is not None:
            raise ValueError("model_args: cannot reshape a model loaded from checkpoint_dir; drop model_args or set checkpoint_dir: null")
        check_path("checkpoint_dir", checkpoint_dir, "checkpoint directory")
        check_path("tokenizer_path", tokenizer_path, "tokenizer file")
        if lr <= 0:
            raise ValueError(f"lr: must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas: each must be in [0, 1), got {list(betas)}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {warmup_steps}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {min_lr_ratio}")
        if lr_schedule == "constant" and min_lr_ratio:
            raise ValueError(f"min_lr_ratio: a constant schedule does not decay; set min_lr_ratio: 0 or lr_schedule: cosine or linear (got {min_lr_ratio})")
        if max_seq_len is not None and max_seq_len <= 0:
            raise ValueError(f"max_seq_len: must be > 0, got {max_seq_len}")
        if loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size: must be >= 0 (0 = no chunking), got {loss_chunk_size}")
        self.optimizer_cls = optimizer_class(optimizer)
        check_optimizer(self.optimizer_cls, optimizer_kwargs(self.optimizer_cls, lr, weight_decay, tuple(betas), optimizer_args))
        self.model_name = model_name
        self.model_args = dict(model_args or {})
        self.checkpoint_dir = checkpoint_dir
        self.tokenizer_path = tokenizer_path
        self.max_seq_len = max_seq_len
        self.optimizer = optimizer
        self.optimizer_args = dict(optimizer_args or {})
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.activation_checkpointing = activation_checkpointing
        self.export = export
        self.loss_chunk_size = loss_chunk_size
        self.compile = compile
        self.model: CausalLM | None = None
        self.tuning: Tuning = Full()  # a recipe with adapters sets its own after this __init__
        self.chat_template: str | None = None  # the Jinja the run's chat data used (`setup`), exported with the model
        self.check_context_length()
        # Here, not in the recipes: Lightning collects the arguments of every __init__ frame up the
        # call chain from this one, so the recipe's own parameters and these (defaults included) are saved.
        self.save_hyperparameters(ignore=["model"])
        self.hparams.pop("model", None)  # the CLI hands Lightning its parsed config, `model: null` included
        self.hparams["model_name"] = model_name  # resolved from the old spelling
        self._hparams_initial = copy.deepcopy(self._hparams)  # what loggers record: the same
        self._step_loss_sum = torch.zeros(())
        self._step_aux_sum = torch.zeros(())  # mixture of experts: the load-balancing loss, times tokens
        self._step_tokens = torch.zeros((), dtype=torch.long)
        self._step_started = 0.0
        self._step_seen_tokens = 0
        self._step_scaled = False  # scale_gradients ran for the step in progress

    # ---- checkpoints -------------------------------------------------------------------------

    @property
    def strict_loading(self) -> bool:
        """Whether checkpoints load strictly: a frozen base (LoRA) is left out of them on purpose
        (`state_dict`), so they load non-strictly and `on_load_checkpoint` checks every adapter is there."""
        return not self.tuning.frozen_base

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """With a frozen base (LoRA), only the trainable tensors (the adapters): the frozen base is
        reloaded from checkpoint_dir, never stored a second time. Lightning's checkpoints, plain or
        sharded (FSDP2 saves and loads exactly the keys this returns), hold adapters only then."""
        state = super().state_dict(*args, **kwargs)
        if self.tuning.frozen_base:
            prefix = kwargs.get("prefix", "")
            trainable = {prefix + name for name, p in self.named_parameters() if p.requires_grad}
            for key in [k for k in state if k.startswith(prefix) and k not in trainable]:
                del state[key]
        return state

    def checkpoint_settings(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The CHECKPOINT_KEYS and the tuning's keys of `hparams` (a checkpoint's, or this recipe's),
        written so that equal settings compare equal. Keys a checkpoint lacks (written before they
        existed) are left out."""
        hparams = dict(hparams)
        if "model_name" not in hparams and "model" in hparams:  # written before the rename
            hparams["model_name"] = hparams["model"]
        settings = {key: hparams[key] for key in (*self.CHECKPOINT_KEYS, *self.tuning.checkpoint_keys) if key in hparams}
        if "model_args" in settings:
            settings["model_args"] = dict(settings["model_args"] or {})
        return self.tuning.checkpoint_settings(settings)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one line naming each differing key, a checkpoint saved with other settings that
        shape the parameters (e.g. another lora_rank): loading it would end in a tensor size mismatch
        or torch's optimizer-group message, which name nothing the user set. Then the tuning's check
        (LoRA: every adapter tensor is there)."""
        saved = checkpoint.get("hyper_parameters")
        if isinstance(saved, Mapping):
            theirs, ours = self.checkpoint_settings(saved), self.checkpoint_settings(self.hparams)
            differ = [f"{key} {theirs[key]!r} in the checkpoint, {ours.get(key)!r} here" for key in theirs if theirs[key] != ours.get(key)]
            if differ:
                raise CheckpointMismatchError(f"checkpoint: saved with other settings than this run: {'; '.join(differ)}; resume with the checkpoint's values or start a new run")
        self.tuning.on_load_checkpoint(checkpoint, self.state_dict())
        if isinstance(checkpoint.get(CHAT_TEMPLATE_KEY), str) and self.chat_template is None:
            self.chat_template = checkpoint[CHAT_TEMPLATE_KEY]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the run's chat template in its checkpoints, so `export --ckpt_path` writes it too."""
        if self.chat_template is not None:
            checkpoint[CHAT_TEMPLATE_KEY] = self.chat_template

    # ---- model -------------------------------------------------------------------------------

    def model_config(self) -> ModelConfig:
        """The architecture: from the checkpoint when there is one, else the named size + model_args."""
        if self.checkpoint_dir is None:
            try:
                return model_config(self.model_name, **self.model_args)
            except (TypeError, ValueError) as err:  # an unknown field in model_args, or a value the config refuses
                raise ValueError(f"model_args: {err}") from None
        config = load_config(self.checkpoint_dir)
        if self.model_name is not None:
            expected = model_config(self.model_name, vocab_size=config.vocab_size, max_seq_len=config.max_seq_len)
            if expected != config:
                raise ValueError(f"model_name: {self.model_name!r} does not match the checkpoint in {self.checkpoint_dir} ({config}); set model_name: null to take the checkpoint's")
        return config

    def check_context_length(self) -> None:
        """Refuse a max_seq_len beyond the model's context length when the recipe is built, so
        `validate` and `fit` fail alike before any data is tokenised. Reads only the architecture:
        the named size's config, or the checkpoint's config.json / params.json (and, for a Meta
        params.json without vocab_size, the embedding's shape); a missing checkpoint_dir is
        reported on its own (validate lists missing paths instead of raising)."""
        if self.max_seq_len is None or (self.checkpoint_dir is not None and not Path(self.checkpoint_dir).exists()):
            return
        context = self.model_config().max_seq_len
        if self.max_seq_len > context:
            source = self.checkpoint_dir if self.checkpoint_dir is not None else self.model_name
            raise ValueError(f"max_seq_len: {self.max_seq_len} exceeds the model's context length {context} ({source}); lower data.max_seq_len")

    def check_data_module(self, data: object) -> None:
        """One line when `data` is not of `DATA_MODULES` (a recipe that needs its own kind of batches sets
        it; None: any). The CLI checks before the run writes anything; `setup` checks for a plain Trainer."""
        if self.DATA_MODULES and data is not None and not isinstance(data, self.DATA_MODULES):
            wanted = " or ".join(f"lightning_tune.{cls.__name__}" for cls in self.DATA_MODULES)
            raise ValueError(f"data: {type(self).__name__} trains on the batches of {wanted}; {type(data).__name__} gives other ones: use {wanted}")

    def setup(self, stage: str) -> None:
        self.check_data_module(self.trainer.datamodule)
        if not any(isinstance(callback, TokenMeanGradients) for callback in self.trainer.callbacks):
            self.trainer.callbacks.insert(0, TokenMeanGradients())  # first: see its docstring
        template = getattr(self.trainer.datamodule, "chat_template_used", None)  # the data modules' Jinja, once set up (chat, pairs, prompts)
        if isinstance(template, str):
            self.chat_template = template

    def configure_model(self) -> None:
        """Build on the meta device (allocating nothing), then load or randomly initialise.

        Lightning calls this inside its device and precision contexts, so the default device and
        dtype here are the ones the Trainer chose (e.g. bf16 for `precision: bf16-true`).
        """
        if self.model is not None:  # called again by trainer.validate/test after fit
            return
        config = self.model_config()
        self.check_context_length()  # again: max_seq_len may have been set after construction
        if self.tokenizer_path is not None:
            vocab = load_tokenizer(self.tokenizer_path).vocab_size
            if vocab > config.vocab_size:
                raise ValueError(f"tokenizer_path: {self.tokenizer_path} has {vocab} pieces but the model's vocab_size is {config.vocab_size}")
        device, dtype = torch.get_default_device(), torch.get_default_dtype()
        with torch.device("meta"):
            model = CausalLM(config)
        model.model.activation_checkpointing = self.activation_checkpointing

        def adapt(model: CausalLM) -> None:  # what trains; then frozen linears in the compute dtype
            self.adapt_model(model)
            self.store_frozen_linears_in_compute_dtype(model)

        mesh = self.sharding_mesh()
        if mesh is None:  # one process, or DDP (a whole replica per process): load, then adapt
            self.materialize(model, device, dtype)
            adapt(model)
        else:  # FSDP2: adapt and shard on meta, then each rank allocates and fills only its shards
            build_sharded(model, mesh, self.trainer.precision, device, adapt, partial(self.materialize, device=device, dtype=dtype), self.reset_adapters)
        self.model = model
        described = self.tuning.describe(model)  # what trains, one line (LoRA: which layers, whether the experts)
        if described:
            rank_zero_info(described)

    def sharding_mesh(self):
        """The data-parallel device mesh to shard over with FSDP2, or None when not sharding.

        Lightning's `ModelParallelStrategy` hands a 2-D (data_parallel, tensor_parallel) mesh to
        `configure_model`; we shard over the data-parallel dimension and do no tensor parallelism.
        Lightning's `FSDPStrategy` (FSDP1) is refused: it would need the whole model in every process.
        """
        trainer = self._trainer
        if trainer is not None and isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
            raise ValueError(
                "trainer.strategy: FSDPStrategy (FSDP1) would load the whole model in every process; use --trainer.strategy fsdp2, which loads each process's shards only (see docs/distributed.md)"
            )
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return None
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                f"trainer.strategy: tensor_parallel_size is {mesh['tensor_parallel'].size()}, but lightning_tune shards with FSDP2 only: "
                f"use --trainer.strategy fsdp2 (or tensor_parallel_size: 1 and data_parallel_size: {mesh.size()})"
            )
        return mesh["data_parallel"]

    def store_frozen_linears_in_compute_dtype(self, model: CausalLM) -> None:
        """Under `bf16-mixed` / `16-mixed`, keep frozen linear weights (LoRA's base) in the half dtype.

        Autocast runs every linear layer in that dtype anyway, so the products are the same bits;
        a frozen weight needs no fp32 master copy (no optimiser updates it), so storing it in half
        precision halves its memory and saves autocast a cast per layer per step. Trainable
        weights, norms and embeddings stay float32.
        """
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        if precision not in ("bf16-mixed", "16-mixed"):
            return
        # A tied head stays: it is the embedding (a half copy would untie them, and FSDP2 would gather it unloaded).
        store_frozen_linears_(model, torch.bfloat16 if precision == "bf16-mixed" else torch.float16)

    def materialize(self, model: CausalLM, device: torch.device, dtype: torch.dtype, init_apply=None) -> None:
        """Fill the base weights: from `checkpoint_dir` one tensor at a time, in the tuning's `loading`
        context (QLoRA wraps and quantises as they arrive), else a random init (`init_apply`: see
        `CausalLM.init_weights`)."""
        if self.checkpoint_dir is not None:
            with self.tuning.loading(model, device):
                load_weights(model, self.checkpoint_dir, dtype=dtype, device=device)
        else:
            if any(p.is_meta for p in model.parameters()):
                model.to_empty(device=device)
                model.to(dtype)
            model.init_weights(apply=init_apply)

    def reset_adapters(self, model: CausalLM) -> None:
        """Initialise what `adapt_model` added, once it has real storage (FSDP2: after sharding)."""
        self.tuning.reset_adapters(model)

    def adapt_model(self, model: CausalLM) -> None:
        """Choose what trains (the tuning's: full, everything; LoRA, adapters only); a hook for recipes."""
        self.tuning.adapt(model, sharded=self.sharding_mesh() is not None)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    # ---- loss --------------------------------------------------------------------------------

    def loss_sum(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed next-token cross-entropy over labelled positions, and their count.

        Logits are computed only where a label exists (prompt and padding positions carry -100),
        so the output head, the largest matmul of a small-batch step, skips the masked half. With
        `loss_chunk_size` the head and the cross-entropy run in chunks of that many positions, so
        the [N, vocab] logits never exist at once (same loss and gradients, see
        `loss.head_cross_entropy_sum`); an adapted (LoRA) head takes the unchunked path.
        """
        input_ids, labels = batch["input_ids"], batch["labels"]
        # Packed batches (`collate_packed`) bring per-sample positions and lengths (`seq_lens`); the
        # model attends within each sample because it is told where each one ends.
        hidden = self.model.hidden_states(input_ids, batch.get("positions"), batch.get("attn_mask"), seq_lens=batch.get("seq_lens"))  # [B, T, E]
        index = batch.get("label_index")  # from the collate functions, on the host (see loss.label_index)
        if index is None:  # a batch built by hand: the same indices, counted on the device
            index = label_index(labels)
        hidden = hidden.flatten(0, 1).index_select(0, index)  # [N, E]: the positions that predict a label
        targets = labels.flatten().index_select(0, index + 1)  # [N]: position t's target is token t + 1
        loss = head_cross_entropy_sum(self.model, hidden, targets, self.loss_chunk_size)
        return loss, targets.new_full((), index.numel())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Return the *summed* loss; `on_before_optimizer_step` divides the accumulated gradient
        by the tokens of the whole optimiser step, so accumulation equals one big batch."""
        loss, tokens = self.loss_sum(batch)
        self._step_loss_sum = self._step_loss_sum.to(loss.device) + loss.detach()
        self._step_tokens = self._step_tokens.to(tokens.device) + tokens
        self._step_seen_tokens += int(batch["input_ids"].numel())
        aux = self.router_aux_loss(batch)
        if aux is None:
            return loss
        # As transformers adds coef * aux to the mean loss: times this micro-batch's tokens here, since
        # the summed loss is divided by the step's tokens (one micro-batch: transformers' loss exactly).
        self._step_aux_sum = self._step_aux_sum.to(aux.device) + aux.detach() * tokens
        return loss + self.model.config.router_aux_loss_coef * aux * tokens

    def router_aux_loss(self, batch: dict[str, Tensor]) -> Tensor | None:
        """A mixture of experts' load-balancing loss of this forward (`CausalLM.router_aux_loss`, transformers'
        `router_aux_loss`), over the real tokens: a padded row's end is its last labelled position
        (packed rows have no padding). None for a dense model."""
        if not self.model.config.num_experts:
            return None
        mask = None
        if batch.get("seq_lens") is None:
            labels = batch["labels"]
            positions = torch.arange(labels.shape[1], device=labels.device)
            last = torch.where(labels != IGNORE_INDEX, positions, -1).amax(dim=1, keepdim=True)  # [B, 1]
            mask = positions[None] <= last
        return self.model.router_aux_loss(mask)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Release the router logits a recipe's loss did not take (every recipe but SFT's: as TRL, their losses
        leave the load-balancing term out)."""
        if self.model is not None and self.model.config.num_experts:
            self.model.take_router_logits()

    def on_fit_start(self) -> None:
        """With `compile`, compile each decoder layer in place (state-dict keys unchanged).

        Layers rather than the whole model: one small graph reused by every layer compiles faster,
        and the chunked loss (a custom autograd function) stays eager. A bf16 precision on a CPU
        that only emulates bf16 is warned about here, once per fit (it is slower than fp32 there).
        """
        precision = str(self._trainer.precision) if self._trainer is not None else ""
        if self.device.type == "cpu" and precision.startswith("bf16"):
            warn_if_bf16_emulated(f"trainer.precision {precision}")
        if self.compile and not getattr(self.model, "_lightning_tune_compiled", False):
            log.warning("compile: compiling the decoder layers with torch.compile; the first steps (and each new sequence length until shapes go dynamic) are slow")
            for layer in self.model.model.layers:
                layer.compile()
            self.model._lightning_tune_compiled = True

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if not self._step_started:  # first micro-batch of an optimiser step
            self._step_started = time.perf_counter()

    def scale_gradients(self) -> None:
        """Once per optimiser step, before any callback sees the gradients (`TokenMeanGradients`):
        Lightning divided each micro-batch loss by accumulate_grad_batches and DDP/FSDP averaged over
        ranks; undo both and divide by the step's labelled tokens (the recipe's count: pairs for DPO)
        over all ranks instead."""
        if self._step_scaled:
            return
        tokens = self.trainer.strategy.reduce(self._step_tokens.float(), reduce_op="sum")
        scale = float(self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens.clamp(min=1))
        for param in self.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)  # a Python float: also valid for FSDP2's sharded (DTensor) gradients
        self._step_scaled = True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the step (the gradients are already per-token means: `scale_gradients`)."""
        self.scale_gradients()  # a no-op when the callback ran; here for trainers set up without `setup`
        tokens = self.trainer.strategy.reduce(self._step_tokens.float(), reduce_op="sum")
        loss_sum = self.trainer.strategy.reduce(self._step_loss_sum.float(), reduce_op="sum")
        elapsed = time.perf_counter() - self._step_started
        self.log_dict(
            {
                "train_loss": loss_sum / tokens.clamp(min=1),
                "lr": optimizer.param_groups[0]["lr"],
                "tokens_per_s": self._step_seen_tokens * self.trainer.world_size / max(elapsed, 1e-9),
                "peak_memory_gib": peak_memory_gib(self.device),
                **({"router_aux_loss": self.trainer.strategy.reduce(self._step_aux_sum.float(), reduce_op="sum") / tokens.clamp(min=1)} if self.model.config.num_experts else {}),
            },
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )
        self._step_loss_sum = torch.zeros_like(self._step_loss_sum)
        self._step_aux_sum = torch.zeros_like(self._step_aux_sum)
        self._step_tokens = torch.zeros_like(self._step_tokens)
        self._step_seen_tokens = 0
        self._step_started = 0.0
        self._step_scaled = False

    # Evaluation: summed loss and label count over the epoch, reduced over ranks, then divided, so
    # the logged loss is per token over the whole set whatever the batch or process count.

    def on_validation_epoch_start(self) -> None:
        self._eval_sums = torch.zeros(2, device=self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, tokens = self.loss_sum(batch)
        self._eval_sums += torch.stack([loss.detach().float(), tokens.float()])

    def on_validation_epoch_end(self) -> None:
        # Already the same on every rank; sync_dist only tells Lightning so (its mean of equal values).
        self.log("val_loss", self._eval_loss(), prog_bar=True, sync_dist=True)

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self.log("test_loss", self._eval_loss(), sync_dist=True)

    def _eval_loss(self) -> Tensor:
        loss_sum, tokens = self.trainer.strategy.reduce(self._eval_sums, reduce_op="sum")
        return loss_sum / tokens.clamp(min=1)

    # ---- optimiser -------------------------------------------------------------------------

    def configure_optimizers(self):
        """The configured optimiser on the trainable parameters (norm weights and biases not decayed)
        and the configured schedule, stepped once per optimiser step over the Trainer's estimated steps."""
        # From the attributes, not the values checked in __init__: Lightning's learning-rate finder sets self.lr.
        kwargs = optimizer_kwargs(self.optimizer_cls, self.lr, self.weight_decay, self.betas, self.optimizer_args)
        groups = param_groups(self.named_parameters(), self.weight_decay, "weight_decay" in kwargs)
        kwargs = with_fused_default(self.optimizer_cls, kwargs, (p for group in groups for p in group["params"]))
        optimizer = self.optimizer_cls(groups, **kwargs)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule, warmup, floor = self.lr_schedule, self.warmup_steps, self.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, schedule, warmup, total, floor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- exports ---------------------------------------------------------------------------

    @property
    def output_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def on_fit_end(self) -> None:
        """Export at the end of fit, written once by rank 0.

        Every rank takes part in gathering the weights (under FSDP each holds only a shard), then
        rank 0 writes while the others wait, so no process exits before the export is complete.
        """
        if not self.export or self.trainer.interrupted:
            return
        state = gather_state_dict(self.model)  # full on rank 0 ({} on the others under FSDP)
        if self.trainer.is_global_zero:
            self.export_to(self.output_dir, state)
        self.trainer.strategy.barrier("export")

    def export_to(self, output_dir: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write the tuning's own exports (LoRA: `adapter/`, PEFT format) and `merged/`, a Hugging Face
        directory that `transformers` loads (adapters folded in).

        `state_dict` is the model's full state dict (default: `self.model.state_dict()`).
        """
        self.tuning.export_to(self.model, output_dir, state_dict, self.checkpoint_dir)
        save_hf_checkpoint(self.export_state_dict(state_dict), self.model.config, output_dir / "merged", tokenizer_path=self.tokenizer_path, chat_template=self.chat_template)

    def export_state_dict(self, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The base model's weights to export (adapters folded in), from the model's full state dict
        (default: the model's own)."""
        return self.tuning.export_state_dict(self.model, state_dict, self.checkpoint_dir)
