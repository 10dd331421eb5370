"""Mixture of experts: the sparse feed-forward layer that replaces the dense MLP in Qwen3-MoE, Mixtral and
gpt-oss layers, its router, the experts held as 3-D tensors, LoRA on those tensors and the load-balancing loss.

Names and layouts are transformers 5's, so a state dict loads without renaming and PEFT's
`target_parameters` are our expert-adapter targets:

    Qwen3-MoE, Mixtral   mlp.gate.weight [X, E]            mlp.experts.gate_up_proj [X, 2I, E] ([gate; up] rows)
                                                            mlp.experts.down_proj    [X, E, I]
    gpt-oss              mlp.router.weight [X, E], .bias    mlp.experts.gate_up_proj [X, E, 2I] (gate, up interleaved
                                                            in columns) + gate_up_proj_bias [X, 2I]
                                                            mlp.experts.down_proj    [X, I, E] + down_proj_bias [X, E]

(X experts, E embed dim, I the experts' intermediate dim.) The Hub's per-expert keys
(`experts.{i}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{i}.w1.weight`) are stacked on load
and written back on export (`checkpoint/hf.py`).

Dispatch: the N x k (token, expert) pairs are sorted by expert once, and each projection is one grouped
matmul over the sorted rows (`torch._grouped_mm`: CPU, and CUDA in bf16; elsewhere a loop over the
groups), so no Python loop over experts runs on the hot path and nothing but the chosen experts computes.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tune.families.config import ModelConfig
from lightning_tune.layers.lora import LazyWeight, adapters_off
from lightning_tune.layers.nf4 import NF4Weight


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `torch._grouped_mm`'s backward
    refuses the expanded (stride 0) gradients that a plain `.sum()` produces."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def grouped_mm(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """x [R, a] (rows sorted by group), weight [G, a, b], offsets [G] int32 (each group's end row) -> [R, b]:
    rows offsets[g-1]:offsets[g] times weight[g].

    One fused call where PyTorch has it (CPU any float dtype; CUDA bf16 on sm90+) and the strides are
    the multiples of 16 bytes it needs (not so for an fp32 rank-2 adapter); else a loop over the groups
    that reads the offsets on the host once."""
    if x.device.type == "meta":  # memory estimates: the grouped product's shape, and what autograd saves for it (x)
        return x @ weight[0].to(x.dtype)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x, weight = x.to(dtype), weight.to(dtype)
    fused = x.device.type == "cpu" or (x.device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0))
    aligned = all(stride == 1 or stride * x.element_size() % 16 == 0 for t in (x, weight) for stride in t.stride())
    if fused and aligned and x.shape[0] > 0:
        return ContiguousGrad.apply(torch._grouped_mm(x, weight, offs=offsets))
    out, start = [], 0
    for group, end in enumerate(offsets.tolist()):
        out.append(x[start:end] @ weight[group])
        start = end
    return torch.cat(out) if out else x.new_zeros(0, weight.shape[-1])


class Parameter3D(nn.Module):
    """One stacked adapter factor as a module with a `weight`, so its state-dict key ends in `lora_A.weight` /
    `lora_B.weight` as every other adapter's (`layers.lora.is_lora_key`)."""

    def __init__(self, *shape: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))


class ExpertAdapter(nn.Module):
    """LoRA on one stacked expert tensor: per expert x, W_x + (alpha / r) B_x A_x, with A [X, r, in] and
    B [X, out, r] ("in"/"out" as the projection maps, whatever the tensor's storage layout).

    Initialised as PEFT's `ParamWrapper` (A Kaiming-uniform with a = sqrt(5) over `in`, B zeros), and
    exported in its layout (`checkpoint/peft.py`: `expert_adapters_to_peft`). No dropout: PEFT's parameter adapters have none.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int, alpha: float, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = Parameter3D(num_experts, rank, in_features, device=device, dtype=dtype)
        self.lora_B = Parameter3D(num_experts, out_features, rank, device=device, dtype=dtype)
        self.adapter_disabled = False  # `layers.lora.adapters_off`
        if not self.lora_A.weight.is_meta:
            self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, apply=None) -> None:
        """`apply(weight, init)` as `LoRALinear.reset_lora_parameters` (FSDP2 draws whole, keeps its shard)."""
        apply = apply or (lambda weight, init: init(weight))
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) of an [r, in] matrix
        apply(self.lora_A.weight, lambda w: nn.init.uniform_(w, -bound, bound))
        apply(self.lora_B.weight, nn.init.zeros_)

    def materialize_(self, device: torch.device | str) -> None:
        self.lora_A.to_empty(device=device)
        self.lora_B.to_empty(device=device)
        self.reset_lora_parameters()

    def delta(self, lora_A: Tensor | None = None, lora_B: Tensor | None = None) -> Tensor:
        """(alpha / r) B_x A_x for every expert: [X, out, in] in fp32."""
        lora_A = self.lora_A.weight if lora_A is None else lora_A
        lora_B = self.lora_B.weight if lora_B is None else lora_B
        return torch.bmm(lora_B.float(), lora_A.float()) * self.scaling


class Experts(nn.Module):
    """X gated MLPs held as stacked tensors (transformers 5's layout of the family, see the module docstring).

    `forward` takes the sorted (token, expert) pairs of `SparseMoE` and runs each projection as one
    grouped matmul. `gpt_oss`: the [X, in, out] storage, biases, gate and up interleaved, and the
    clamped SwiGLU (up + 1) * gate * sigmoid(alpha * gate) with gate <= limit, |up| <= limit.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        X, E, I = config.num_experts, config.embed_dim, config.moe_intermediate_dim
        self.num_experts, self.embed_dim, self.intermediate_dim = X, E, I
        self.gpt_oss = config.model_type == "gpt_oss"
        if self.gpt_oss:
            self.gate_up_proj = nn.Parameter(torch.empty(X, E, 2 * I))
            self.gate_up_proj_bias = nn.Parameter(torch.empty(X, 2 * I))
            self.down_proj = nn.Parameter(torch.empty(X, I, E))
            self.down_proj_bias = nn.Parameter(torch.empty(X, E))
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(X, 2 * I, E))
            self.down_proj = nn.Parameter(torch.empty(X, E, I))
        self.gate_up_lora: ExpertAdapter | None = None
        self.down_lora: ExpertAdapter | None = None
        # QLoRA: the stacked weights as NF4, flattened to [X * a, b] (each expert's rows contiguous)
        self.nf4 = nn.ModuleDict()
        self.base_dtype = self.down_proj.dtype

    @property
    def quantized(self) -> bool:
        return len(self.nf4) > 0

    @torch.no_grad()
    def quantize_(self) -> None:
        """QLoRA: store both stacked weights in NF4 (bitsandbytes' layout, as `layers.lora.QLinear`) and leave
        empty frozen placeholders; on the meta device only the placeholders (a checkpoint fills them:
        `quantize_weight_`). Each forward dequantises the whole stack, one layer at a time."""
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(self, name)
            self.base_dtype = weight.dtype
            X, a, b = weight.shape
            self.nf4[name] = NF4Weight(X * a, b, device=weight.device)
            if not weight.is_meta:
                self.nf4[name].quantize_(weight.reshape(X * a, b))
            self.nf4[name].stack_shape = torch.Size([X, a, b])
            setattr(self, name, nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device), requires_grad=False))

    @torch.no_grad()
    def quantize_weight_(self, name: str, weight: Tensor) -> None:
        """Quantise a checkpoint's stacked tensor `name` as it arrives (the high-precision stack never kept)."""
        nf4 = self.nf4[name]
        if tuple(weight.shape) != tuple(nf4.stack_shape):
            raise ValueError(f"NF4 experts {name}: expected shape {list(nf4.stack_shape)}, got {list(weight.shape)}")
        self.base_dtype = weight.dtype
        self.nf4[name] = NF4Weight(*nf4.shape, device=weight.device).quantize_(weight.reshape(nf4.shape))
        self.nf4[name].stack_shape = nf4.stack_shape

    def weight(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """Stacked tensor `name` as the forward uses it: the parameter, or its NF4 storage dequantised (to
        `dtype`, default the dtype it was quantised from)."""
        if name not in self.nf4:
            return getattr(self, name)
        nf4 = self.nf4[name]
        return nf4.dequantize(dtype or self.base_dtype).view(nf4.stack_shape)

    @property
    def is_transposed(self) -> bool:
        """PEFT's name: the tensors are stored [X, in, out] (gpt-oss) rather than [X, out, in]."""
        return self.gpt_oss

    def add_adapters(self, rank: int, alpha: float) -> None:
        """LoRA on both stacked projections (on the device and dtype of the weights; on meta until `materialize_`)."""
        X, E, I = self.num_experts, self.embed_dim, self.intermediate_dim
        device, dtype = self.down_proj.device, self.down_proj.dtype
        self.gate_up_lora = ExpertAdapter(X, E, 2 * I, rank, alpha, device, dtype)
        self.down_lora = ExpertAdapter(X, I, E, rank, alpha, device, dtype)

    def adapters(self) -> dict[str, ExpertAdapter]:
        """Parameter name -> its adapter (empty without LoRA)."""
        pairs = {"gate_up_proj": self.gate_up_lora, "down_proj": self.down_lora}
        return {name: adapter for name, adapter in pairs.items() if adapter is not None}

    def _project(self, x: Tensor, name: str, offsets: Tensor, experts: Tensor) -> Tensor:
        """Rows x [R, in] (sorted by expert) through projection `name` of their experts -> [R, out]."""
        device = x.device.type
        weight = self.weight(name, torch.get_autocast_dtype(device) if device != "meta" and torch.is_autocast_enabled(device) else x.dtype)
        out = grouped_mm(x, weight if self.gpt_oss else weight.transpose(1, 2), offsets)
        if self.gpt_oss:
            out = out + getattr(self, f"{name}_bias")[experts].to(out.dtype)
        adapter = self.adapters().get(name)
        if adapter is not None and not adapter.adapter_disabled:
            # the rank-r intermediate, scaled there (as LoRALinear): r numbers per row instead of out
            low = grouped_mm(x, adapter.lora_A.weight.transpose(1, 2), offsets) * adapter.scaling
            out = out + grouped_mm(low, adapter.lora_B.weight.transpose(1, 2), offsets)
        return out

    def forward(self, x: Tensor, offsets: Tensor, experts: Tensor) -> Tensor:
        """x [R, E], the rows of the (token, expert) pairs sorted by expert; offsets [X] each expert's end
        row; experts [R] each row's expert -> [R, E], each row through its expert."""
        gate_up = self._project(x, "gate_up_proj", offsets, experts)
        if self.gpt_oss:
            gate, up = gate_up[..., ::2].clamp(max=GPT_OSS_LIMIT), gate_up[..., 1::2].clamp(-GPT_OSS_LIMIT, GPT_OSS_LIMIT)
            hidden = (up + 1) * (gate * torch.sigmoid(gate * GPT_OSS_ALPHA))
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = F.silu(gate) * up  # every MoE family's activation (ModelConfig checks it)
        return self._project(hidden, "down_proj", offsets, experts)


# gpt-oss's clamped SwiGLU (transformers' GptOssConfig.swiglu_limit, GptOssExperts.alpha).
GPT_OSS_LIMIT = 7.0
GPT_OSS_ALPHA = 1.702


class Router(nn.Module):
    """Scores every expert per token and keeps the top k: (logits [N, X], weights [N, k], experts [N, k]).

    "softmax_topk" (Qwen3-MoE, Mixtral): softmax over all X in fp32, the top k of those, renormalised
    when `norm_topk_prob`, then in the logits' dtype (transformers' Qwen3MoeTopKRouter; Mixtral keeps
    fp32, the same numbers in an fp32 model). "topk_softmax" (gpt-oss): the top k logits (a bias added),
    then a softmax over those k.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.kind, self.norm_topk_prob = config.num_experts_per_tok, config.router, config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.embed_dim))
        self.bias = nn.Parameter(torch.empty(config.num_experts)) if config.router == "topk_softmax" else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = F.linear(x, self.weight, self.bias)  # [N, X]
        if self.kind == "topk_softmax":
            top, experts = torch.topk(logits, self.top_k, dim=-1)
            return logits, torch.softmax(top, dim=-1, dtype=top.dtype), experts
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), experts


class SparseMoE(nn.Module):
    """The sparse feed-forward layer: x [B, T, E] -> sum over each token's k experts of weight * expert(x).

        x ─► router ─► top-k (experts, weights) ─► sort the N*k pairs by expert ─► rows x[token]
          ─► experts (grouped gate_up, act, grouped down) ─► * weight ─► index_add back per token

    In training, the router's logits of the last forward are kept (`router_logits`) for the
    load-balancing loss (`CausalLM.router_aux_loss`), which takes them back.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        router = Router(config)
        # transformers' module names: `mlp.gate` (Qwen3-MoE, Mixtral), `mlp.router` (gpt-oss)
        self.router_name = "router" if config.model_type == "gpt_oss" else "gate"
        self.add_module(self.router_name, router)
        self.experts = Experts(config)
        self.router_logits: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        B, T, E = x.shape
        flat = x.reshape(-1, E)  # [N, E]
        logits, weights, experts = getattr(self, self.router_name)(flat)  # [N, X], [N, k], [N, k]
        if self.training and torch.is_grad_enabled():
            self.router_logits = logits
        k = experts.shape[-1]
        pairs = experts.flatten()  # [N*k]: token n's j-th expert at n*k + j
        order = torch.argsort(pairs, stable=True)  # by expert; within one, by token
        counts = torch.zeros(self.experts.num_experts, dtype=torch.long, device=x.device).scatter_add_(0, pairs, torch.ones_like(pairs))  # bincount, also on meta (estimates)
        offsets = counts.cumsum(0).to(torch.int32)
        tokens = order // k
        out = self.experts(flat.index_select(0, tokens), offsets, pairs.index_select(0, order))  # [N*k, E]
        out = out * weights.flatten().index_select(0, order)[:, None].to(out.dtype)
        return torch.zeros_like(flat).index_add_(0, tokens, out.to(flat.dtype)).view(B, T, E)


def load_balancing_loss(router_logits: list[Tensor], num_experts: int, top_k: int, mask: Tensor | None = None) -> Tensor:
    """Mixtral's (Switch Transformer's) auxiliary loss over every sparse layer, as transformers'
    `load_balancing_loss_func`: X * sum_x f_x * P_x, with f_x the share of (token, slot) assignments to
    expert x and P_x its mean router probability, both pooled over the layers' tokens; `mask` [N] (1 a
    real token, 0 padding) leaves padding out."""
    device = router_logits[0].device
    assigned = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    weight = None if mask is None else mask.reshape(-1).to(device, torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        _, chosen = torch.topk(probs, top_k, dim=-1)
        ones = torch.ones(chosen.numel(), device=device) if weight is None else weight.repeat_interleave(top_k)
        assigned = assigned + torch.zeros(num_experts, device=device).scatter_add_(0, chosen.reshape(-1), ones)
        probs_sum = probs_sum + (probs if weight is None else probs * weight[:, None]).sum(0)
        rows = rows + (probs.shape[0] if weight is None else weight.sum())
    rows = rows.clamp(min=1)  # every token padding (a batch without a labelled token): 0, not 0 / 0
    return num_experts * torch.sum((assigned / rows) * (probs_sum / rows))


@torch.no_grad()
def merged_expert_tensors(model: nn.Module, state: dict[str, Tensor], base_weights=None) -> dict[str, Tensor | LazyWeight]:
    """Every stacked expert tensor whose export differs from `state` (the model's full state dict): an adapted
    one with its adapter folded in (fp32 sum, cast back to the wider of the base's and the adapter's dtype),
    and every NF4 one (QLoRA). NF4 ones are `LazyWeight`s, computed when written, from `base_weights(key)`
    (the original high-precision tensor read again from checkpoint_dir, as `layers.lora.merged_state_dict`
    does for linears) or, without it, the dequantised NF4 stack."""
    merged: dict[str, Tensor | LazyWeight] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Experts):
            continue
        adapters = module.adapters()
        for param in ("gate_up_proj", "down_proj"):
            key, adapter = f"{name}.{param}", adapters.get(param)
            factors = None
            if adapter is not None:
                prefix = f"{name}.{param.removesuffix('_proj')}_lora"
                factors = (state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"])

            def fold(base: Tensor, adapter=adapter, factors=factors, transposed=module.is_transposed) -> Tensor:
                if adapter is None:
                    return base
                delta = adapter.delta(*factors)
                return (base.float() + (delta.transpose(1, 2) if transposed else delta)).to(torch.promote_types(base.dtype, factors[0].dtype))

            if param in module.nf4:
                read = (lambda key=key: base_weights(key)) if base_weights is not None else (lambda module=module, param=param: module.weight(param))
                dtype = module.base_dtype if factors is None else torch.promote_types(module.base_dtype, factors[0].dtype)
                merged[key] = LazyWeight(module.nf4[param].stack_shape, dtype, lambda read=read, fold=fold: fold(read()))
            elif adapter is not None:
                merged[key] = fold(state[key])
    return merged


def quantize_experts(model: nn.Module) -> list[str]:
    """QLoRA: every `Experts` module's stacked weights in NF4 (`Experts.quantize_`); their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, Experts)]
    for name in names:
        model.get_submodule(name).quantize_()
    return names


def quantized_expert_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """`<experts>.<gate_up_proj | down_proj>` -> the checkpoint's stacked shape, for every NF4 stack
    (its parameter is an empty placeholder), as `layers.lora.quantized_base_shapes` for linears."""
    return {f"{name}.{param}": nf4.stack_shape for name, m in model.named_modules() if isinstance(m, Experts) for param, nf4 in m.nf4.items()}


def expert_adapters(model: nn.Module) -> dict[str, ExpertAdapter]:
    """`<experts module>.<gate_up_proj | down_proj>` -> its adapter, for every adapted expert tensor."""
    return {f"{name}.{param}": adapter for name, module in model.named_modules() if isinstance(module, Experts) for param, adapter in module.adapters().items()}


def add_expert_adapters(model: nn.Module, rank: int, alpha: float) -> list[str]:
    """LoRA on both stacked projections of every `Experts` module; returns the adapted tensors' names."""
    for module in model.modules():
        if isinstance(module, Experts):
            module.add_adapters(rank, alpha)
    return list(expert_adapters(model))


def disable_expert_adapters(model: nn.Module) -> AbstractContextManager[None]:
    """Inside, every expert adapter is off (the base experts alone), as `layers.lora.disable_adapters`."""
    return adapters_off(expert_adapters(model).values())
