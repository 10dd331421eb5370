"""Estimate the peak memory per device of a fine-tuning run before launching it, without allocating.

The estimate (bytes per device; P = all parameters, P_t = trainable ones, b = bytes per parameter:
4 for `32` and `bf16-mixed`, 2 for `bf16-true` / `16-true`; a = bytes of the compute dtype; S = shards:
devices x num_nodes under FSDP, else 1):

    weights     = P * b / S   (bf16-mixed: frozen linear weights, e.g. LoRA's base, are stored in bf16,
                               2 bytes: autocast computes them in bf16 anyway and nothing updates them)
                + FSDP: the unsharded parameters being computed on, all-gathered in the compute dtype.
                  With every decoder layer its own unit (`fsdp2`, or FSDP1 with an `auto_wrap_policy`):
                  two layers (the one computing and the next one, prefetched) plus the root unit
                  (embeddings, final norm, lm_head), which is not resharded after forward and so stays
                  gathered from the embedding in forward to the embedding in backward. Without an
                  `auto_wrap_policy` (FSDP1): the whole model (one flat unit)
                + bf16-mixed without FSDP: a bf16 copy of every trainable linear weight (2 bytes
                  each), which autocast caches during forward/backward
                  QLoRA (NF4 bases): those weights cost 0.5 byte per element + 1/64 (absmax codes)
                  + 4/16384 (their scales) instead of b (`nf4_and_dora_bytes`)
    gradients   = P_t * b / S    (+ the same again for DDP's gradient buckets when devices x num_nodes > 1)
    optimizer   = s * P_t / S   (s: the chosen optimiser's state bytes per parameter, measured by
                                 `optim.state_bytes_per_parameter`: AdamW 2 * b (exp_avg, exp_avg_sq),
                                 SGD with momentum b, 8-bit AdamW about 2, a quarter of AdamW's in fp32)
    activations = stored + max(head, layer_backward)
        stored         = what autograd keeps for backward from embedding to final norm for one
                         micro-batch [batch_size, max_seq_len], i.e. the worst case of full-length
                         batches: per decoder layer x num_layers (with activation checkpointing only
                         each layer's input is kept)
        head           = lm_head + float32 cross-entropy on every position N = B * (T - 1): see
                         `head_activations` (chunked: O(N * E + chunk * vocab); else O(N * vocab))
        layer_backward = the gradients alive while one layer runs backward: the widest are three
                         [N, intermediate] (SwiGLU) and two [N, E], N = B * T (a mixture of experts:
                         three [N * k, moe_intermediate] and k + 2 [N, E], k experts per token); with activation
                         checkpointing plus that layer's recomputed activations; under FSDP plus the
                         unsharded parameter gradients before reduce-scatter: the root's trainable ones
                         (a bytes, held until the root's backward ends) and one layer's (a bytes, and
                         b bytes more for the reduce-scatter input they are copied into); one flat unit:
                         all trainable ones (a + b bytes); plus the largest per-layer temporary:
                         QLoRA's dequantised [out, in] weight (a bytes; a mixture of experts: one
                         dequantised stack [X, out, in]), DoRA's three [out, in] for the weight norm
    peak = weights + optimizer + max(activations + (gradients if accumulate_grad_batches > 1),
                                     gradients + optimizer-step temporaries)
    and, for a recipe that samples before it trains (GRPO), at least its rollout phase:
    rollout     = weights as stored (no training all-gathers) + optimizer (+ gradients if accumulating)
                + the KV cache of rows x (prompt + completion) tokens: 2 x layers x kv_heads x head_dim, a bytes each
                + the next-token logits [rows, vocab] (float32, and one copy for sampling)
                + FSDP: the whole model gathered in the compute dtype (`sharding.gathered_for_decoding`)

The per-layer activations are not a hand-written formula: one and two decoder layers of the real model
(with the recipe's LoRA adapters and frozen parameters) run forward on the meta device under
`torch.autograd.graph.saved_tensors_hooks`, which reports every tensor autograd saves; the two-layer
minus the one-layer total is one layer. That follows the code (SDPA's saved outputs, RoPE, RMSNorm in
float32, LoRA dropout) instead of approximating it. Optimiser-step temporaries: CUDA's foreach AdamW
holds one extra copy of the trainable parameters; on a CPU AdamW goes tensor by tensor.

Not counted: the CUDA context and allocator fragmentation (add ~1-2 GiB on a GPU), NCCL buffers, and
for bf16-mixed the residual stream that autocast keeps in float32 (activations are traced in bf16).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, replace

import torch
from torch import nn

from lightning_tune.families import ModelConfig
from lightning_tune.layers.lora import LoRALinear, QLinear
from lightning_tune.model import CausalLM
from lightning_tune.model.moe import Experts
from lightning_tune.training.optim import state_bytes_per_parameter

GIB = 2**30
HALF_PRECISIONS = ("bf16-true", "16-true", "bf16", "16", "half")
MIXED_PRECISIONS = ("bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of each part of the peak; `total` is the estimated peak."""

    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    total: int
    rollout: int = 0  # GRPO: the peak while sampling (counted in total when it is the larger phase)
    active: int = 0  # a mixture of experts: the parameters one token computes with (0: all of them)

    def lines(self, device_memory: int | None = None) -> list[str]:
        """Human-readable summary, compared with `device_memory` bytes when given."""
        pct = 100 * self.trainable / max(1, self.parameters)
        out = [
            f"parameters            {self.parameters:,}" + (f" ({self.active:,} active per token)" if self.active else ""),
            f"trainable parameters  {self.trainable:,} ({pct:.2f}%)",
            "estimated peak memory per device:",
            f"  weights             {self.weights / GIB:8.2f} GiB",
            f"  gradients           {self.gradients / GIB:8.2f} GiB",
            f"  optimizer state     {self.optimizer / GIB:8.2f} GiB",
            f"  activations         {self.activations / GIB:8.2f} GiB",
            *([f"  while sampling      {self.rollout / GIB:8.2f} GiB (rollouts: KV cache; under FSDP the gathered model)"] if self.rollout else []),
            f"  peak (estimate)     {self.total / GIB:8.2f} GiB",
        ]
        if device_memory is not None:
            verdict = "fits" if self.total <= device_memory else "does NOT fit"
            out.append(f"  device memory       {device_memory / GIB:8.2f} GiB: {verdict} ({100 * self.total / device_memory:.0f}% of it)")
        return out


def param_bytes(precision: str) -> int:
    """Bytes per parameter: half precision stores bf16/fp16 weights, 32 and *-mixed store float32."""
    return 2 if str(precision) in HALF_PRECISIONS else 4


def compute_dtype(precision: str) -> torch.dtype:
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16") or precision == "half":
        return torch.float16
    return torch.float32


def saved_bytes(fn, params: nn.Module) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn()` runs (parameters excluded)."""
    exclude = {p.untyped_storage()._cdata for p in params.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in exclude:
            seen[storage._cdata] = max(seen.get(storage._cdata, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def build_meta_model(config: ModelConfig, adapt, dtype: torch.dtype, activation_checkpointing: bool = False) -> CausalLM:
    """The recipe's model on the meta device (no memory): `adapt` applies LoRA / freezing."""
    with torch.device("meta"):
        model = CausalLM(config)
    model.to(dtype)
    model.tie_weights()  # .to() unties a tied head: it would be counted twice
    model.model.activation_checkpointing = activation_checkpointing
    adapt(model)
    return model.train()


def decoder_activations(config: ModelConfig, adapt, dtype: torch.dtype, batch_size: int, seq_len: int, checkpointing: bool) -> tuple[int, int]:
    """(base, per_layer) bytes saved by the decoder: traced with one and two layers on meta."""
    tokens = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    totals = []
    for layers in (1, 2):
        model = build_meta_model(replace(config, num_layers=layers), adapt, dtype, checkpointing)
        totals.append(saved_bytes(lambda model=model: model.model(tokens), model))
    per_layer = totals[1] - totals[0]
    return totals[0] - per_layer, per_layer


def head_activations(config: ModelConfig, adapt, dtype: torch.dtype, batch_size: int, seq_len: int, loss_chunk_size: int = 0) -> int:
    """Memory of the output head + float32 cross-entropy over all N = B*(T-1) positions (worst case).

    Chunked (`loss_chunk_size`, plain lm_head; see `linear_cross_entropy_sum`): the [N, E] input copy,
    the [N, E] input gradient computed in forward and scaled in backward (two), one chunk's
    [chunk, V] float32 log-probabilities (and the half logits they came from, which then hold the
    cast gradient), and lm_head's float32 gradient (twice:
    accumulated, then scaled) when it trains. Unchunked: traced like the decoder, plus the float32
    [N, V] gradient of the logits (and its cast when logits are half) alive at the start of backward.
    """
    model = build_meta_model(replace(config, num_layers=1), adapt, dtype)
    n = batch_size * (seq_len - 1)
    a = dtype.itemsize
    weight = model.plain_head_weight() if loss_chunk_size else None  # the rule of `loss.head_inputs`
    if weight is not None:
        weight_grad = 2 * weight.numel() * 4 if weight.requires_grad else 0
        logits = 4 + (a if dtype != torch.float32 else 0)  # half logits + their fp32 log-probabilities; fp32: one buffer
        return 3 * n * config.embed_dim * a + min(loss_chunk_size, n) * config.vocab_size * logits + weight_grad
    hidden = torch.empty(n, config.embed_dim, dtype=dtype, device="meta", requires_grad=True)
    targets = torch.zeros(n, dtype=torch.long, device="meta")
    saved = saved_bytes(lambda: nn.functional.cross_entropy(model.logits(hidden * 1).float(), targets, reduction="sum"), model)
    return saved + n * config.vocab_size * (4 + (a if dtype != torch.float32 else 0))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def estimate_memory(
    config: ModelConfig,
    adapt,
    *,
    batch_size: int,
    seq_len: int,
    precision: str = "32",
    activation_checkpointing: bool = False,
    strategy: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    fsdp_wrapped_layers: bool = False,
    accumulate_grad_batches: int = 1,
    accelerator: str = "cpu",
    loss_chunk_size: int = 0,
    optimizer: str = "torch.optim.AdamW",
    optimizer_args: dict | None = None,
    reference_copy: bool = False,
    rollout: tuple[int, int] | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory per device of a training step (see the module docstring for the formula).

    `adapt(model)` is the recipe's `adapt_model` (LoRA / freezing); `strategy` is "fsdp", "ddp" or
    anything else (single device); `devices` is per node; `fsdp_wrapped_layers` says whether FSDP
    wraps each decoder layer (always true for `fsdp2`); `reference_copy`: a frozen copy of the whole
    model is held too (full DPO's reference without `precompute_reference`); `rollout`: (rows, tokens per
    row) the recipe samples before each training forward (GRPO), whose phase may be the peak.
    """
    dtype = compute_dtype(precision)
    a = dtype.itemsize
    b = param_bytes(precision)
    model = build_meta_model(config, adapt, torch.float32)
    total, trainable = count_parameters(model)
    layer_params, layer_trainable = max(count_parameters(layer) for layer in model.model.layers)  # a sparse layer where some are
    root_params, root_trainable = total - config.num_layers * layer_params, trainable - config.num_layers * layer_trainable
    processes = devices * num_nodes
    fsdp = strategy == "fsdp"
    shards = processes if fsdp else 1

    linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    frozen_linear = sum(w.numel() for w in linears if not w.requires_grad)
    stored_bytes = total * b - (frozen_linear * (b - a) if precision in MIXED_PRECISIONS else 0)
    nf4, transient = nf4_and_dora_bytes(model, a)
    stored_bytes += nf4
    weights = stored_bytes // shards
    if reference_copy:  # a deep copy of the model as it was built: every parameter in its stored dtype
        weights += total * b
    stored_weights = weights  # before the all-gathers of training
    if fsdp:  # parameters gathered for compute, in the compute dtype
        weights += (root_params + 2 * layer_params if fsdp_wrapped_layers else total) * a
    elif precision in MIXED_PRECISIONS:  # autocast's cached copies of the trainable linear weights
        weights += sum(w.numel() for w in linears if w.requires_grad) * a
    gradients = trainable * b // shards
    if strategy == "ddp" and processes > 1:
        gradients *= 2  # DDP's gradient buckets
    param_dtype = torch.float32 if b == 4 else dtype  # bf16-true / 16-true: parameters, and so Adam's state, in half precision
    optimizer_bytes = int(state_bytes_per_parameter(optimizer, optimizer_args, param_dtype) * trainable) // shards
    step_temp = trainable * b // shards if accelerator not in ("cpu",) else 0

    base, per_layer = decoder_activations(config, adapt, dtype, batch_size, seq_len, activation_checkpointing)
    stored = base + config.num_layers * per_layer
    n = batch_size * seq_len
    width = 3 * config.intermediate_dim + 2 * config.embed_dim  # widest gradients alive: SwiGLU's three, two of the residual
    if config.num_experts:  # a sparse layer: every token's k rows of the experts' SwiGLU and their outputs
        width = max(width, 3 * config.num_experts_per_tok * config.moe_intermediate_dim + (config.num_experts_per_tok + 2) * config.embed_dim)
    layer_backward = n * width * a + transient
    if activation_checkpointing:  # the layer's activations, recomputed for its backward
        layer_backward += decoder_activations(config, adapt, dtype, batch_size, seq_len, False)[1]
    if fsdp:  # unsharded parameter gradients awaiting reduce-scatter (and its input buffer)
        layer_backward += root_trainable * a + layer_trainable * (a + b) if fsdp_wrapped_layers else trainable * (a + b)
    head = head_activations(config, adapt, dtype, batch_size, seq_len, loss_chunk_size)
    activations = stored + max(head, layer_backward)

    held_grads = gradients if accumulate_grad_batches > 1 else 0
    peak = weights + optimizer_bytes + max(activations + held_grads, gradients + step_temp)
    sampling = 0
    if rollout is not None:
        rows, tokens = rollout
        kv_cache = rows * tokens * config.num_layers * 2 * config.num_kv_heads * config.head_dim * a
        logits = 2 * rows * config.vocab_size * 4
        sampling = stored_weights + optimizer_bytes + held_grads + kv_cache + logits + (total * a if fsdp else 0)
        peak = max(peak, sampling)
    parameters = total + sum(m.base_nf4.shape.numel() for m in model.modules() if isinstance(m, QLinear) and m.quantized)
    parameters += sum(nf4.shape.numel() for m in model.modules() if isinstance(m, Experts) for nf4 in m.nf4.values())
    active = 0
    if config.num_experts:  # each sparse layer computes k of its X experts (and their adapters) per token
        X, k = config.num_experts, config.num_experts_per_tok
        stacks = [sum(p.numel() for p in m.parameters()) + sum(w.shape.numel() for w in m.nf4.values()) for m in model.modules() if isinstance(m, Experts)]
        active = parameters - sum(stack * (X - k) // X for stack in stacks)
    return MemoryEstimate(parameters, trainable, weights, gradients, optimizer_bytes, activations, peak, sampling, active)


def nf4_and_dora_bytes(model: nn.Module, a: int) -> tuple[int, int]:
    """(bytes of the NF4 bases, the largest per-layer temporary of QLoRA / DoRA), on a meta model.

    NF4 (`layers.nf4.NF4Weight`): 0.5 byte per element + 1/64 (absmax codes) + 4/16384 (their scales)
    + the code tables, the exact sizes of its tensors. Temporaries while one layer computes (forward,
    or backward, which dequantises again): the dequantised [out, in] weight in the compute dtype (a
    bytes); DoRA: B A, W and W + s B A, three [out, in] in the adapters' dtype, for the weight norm.
    """
    nf4 = temporary = 0
    for m in model.modules():
        if isinstance(m, QLinear):
            numel = m.out_features * m.in_features
            layer = numel * a if m.quantized else 0
            if m.quantized:
                nf4 += m.base_nf4.nbytes
            if isinstance(m, LoRALinear) and m.use_dora:
                layer += 3 * numel * m.lora_A.weight.element_size()
            temporary = max(temporary, layer)
        elif isinstance(m, Experts) and m.quantized:  # QLoRA's experts: NF4 stacks, each dequantised whole per forward
            nf4 += sum(w.nbytes for w in m.nf4.values())
            temporary = max(temporary, max(w.shape.numel() for w in m.nf4.values()) * a)
    return nf4, temporary


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocator peak on CUDA, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
