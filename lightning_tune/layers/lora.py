"""LoRA: low-rank adapters on linear layers, DoRA's magnitude, an NF4 base (QLoRA), and the helpers to
apply, freeze, collect and merge them.

`LoRALinear` *is* an `nn.Linear` (same `weight`, same state-dict key), with two extra submodules
`lora_A` [r, in] and `lora_B` [out, r] (and, for DoRA, the parameter `lora_magnitude_vector` [out]).
So a base checkpoint loads into a LoRA model unchanged, and the adapter keys are PEFT's
(`...q_proj.lora_A.weight`, `...q_proj.lora_magnitude_vector`) once prefixed with `base_model.model.`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tune.layers.nf4 import NF4Weight, nf4_linear

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
OUTPUT_TARGET = "lm_head"
# Meta's and torchtune's names for the same layers, accepted in configs.
TARGET_ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "output_proj": "o_proj", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj", "output": "lm_head"}


class QLinear(nn.Linear):
    """An `nn.Linear` whose frozen weight can be stored in NF4 (QLoRA's base), dequantised per forward.

    `quantize_base_` stores W as `quantize.NF4Weight` and leaves `weight` an empty frozen placeholder,
    so the layer is still an `nn.Linear` with a `weight` to code that walks linears. QLoRA stores every
    frozen linear layer except the output head, as transformers' `BitsAndBytesConfig(load_in_4bit)`
    does: `LoRALinear` (a subclass) for the adapted ones, plain `QLinear` for the others.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.base_nf4: NF4Weight | None = None
        self.base_dtype = self.weight.dtype  # the dtype W had before quantisation (merges cast back to it)

    @property
    def quantized(self) -> bool:
        return self.base_nf4 is not None

    def _base_is_meta(self) -> bool:
        return self.base_nf4.is_meta if self.quantized else self.weight.is_meta

    def base_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """W as the forward sees it: the weight, or the NF4 weight dequantised (to `dtype`, default
        the dtype it was quantised from)."""
        if self.quantized:
            return self.base_nf4.dequantize(dtype or self.base_dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    @torch.no_grad()
    def quantize_base_(self, weight: Tensor | None = None) -> None:
        """Store W (`weight`, default the layer's own) as NF4 on its device and drop the
        high-precision tensor; on the meta device only the placeholders are made (estimates)."""
        weight = self.weight if weight is None else weight
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4 base weight: expected shape {[self.out_features, self.in_features]}, got {list(weight.shape)}")
        nf4 = NF4Weight(self.out_features, self.in_features, device=weight.device)
        if not weight.is_meta:
            nf4.quantize_(weight)
        self.base_nf4 = nf4
        self.base_dtype = weight.dtype
        self.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self._base_forward(x)

    def _base_forward(self, x: Tensor, bias: bool = True) -> Tensor:
        bias = self.bias if bias else None
        if not self.quantized:
            return F.linear(x, self.weight, bias)
        # bitsandbytes' matmul does not autocast: give it x in the dtype F.linear would compute in.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if device != "meta" and torch.is_autocast_enabled(device) else x.dtype
        return nf4_linear(x.to(dtype), self.base_nf4, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", base=nf4" if self.quantized else "")


class LoRALinear(QLinear):
    """y = W x + (alpha / r) * B A dropout(x), with W frozen and A, B trained; optionally DoRA, NF4 base.

    Initialised as PEFT does: A Kaiming-uniform with a = sqrt(5), B zeros, so a fresh adapter
    leaves the model's output unchanged.

    DoRA (`use_dora`): a trained magnitude per output row, `lora_magnitude_vector` (PEFT's name),
    initialised to the row norms of W + (alpha/r) B A; the output is PEFT's
    W x + (m / ||W + s B A|| - 1) (W x) + (m / ||W + s B A||) s B A x, with the norm detached (DoRA
    paper, section 4.3) and the bias not rescaled.

    QLoRA (`quantize_base_`, see `QLinear`): W is stored as NF4 and dequantised per forward in the
    compute dtype; the adapters keep their own dtype (float32 under bf16-mixed).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.use_dora = use_dora
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.merged = False
        self.adapter_disabled = False  # `disable_adapters`: the base layer alone (a DPO reference)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, apply: Callable[[Tensor, Callable[[Tensor], object]], None] | None = None) -> None:
        """`apply(weight, init)` runs each initialiser (default: `init(weight)`); FSDP2 passes
        `sharding.init_like_unsharded_` so sharded adapters get one process's values. DoRA's
        magnitude needs the base weight, so it is set only once W has values (not on meta)."""
        apply = apply or (lambda weight, init: init(weight))
        apply(self.lora_A.weight, lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)))
        apply(self.lora_B.weight, nn.init.zeros_)
        if self.use_dora and not self._base_is_meta():
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ||W + s B A|| per output row, as PEFT's `DoraLinearLayer.update_layer` computes it
        (from the dequantised weight when W is NF4; fp16 adapters multiplied in float32)."""
        from torch.distributed.tensor import DTensor

        lora_A, lora_B = self.lora_A.weight, self.lora_B.weight
        magnitude = self.lora_magnitude_vector
        if isinstance(magnitude, DTensor):  # FSDP2: every rank its rows (W, B and m are sharded alike, by rows)
            if not all(isinstance(t, DTensor) and t.placements == magnitude.placements and t.placements[0].is_shard(0) for t in (self.weight, lora_B)):
                raise ValueError("use_dora: FSDP2 must shard the base weight, lora_B and the magnitude by rows (fully_shard's default) to set the magnitudes")
            weight, lora_B, lora_A = self.weight.to_local(), lora_B.to_local(), lora_A.full_tensor()
        else:
            weight = self.base_weight()
        half = lora_A.dtype == torch.float16
        lora_weight = lora_B.float() @ lora_A.float() if half else lora_B @ lora_A
        if half:
            lora_weight = lora_weight.half()
        weight_norm = torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype)
        if isinstance(magnitude, DTensor):
            magnitude.to_local().copy_(weight_norm)
        else:
            self.lora_magnitude_vector.data = weight_norm.to(magnitude.dtype)

    @torch.no_grad()
    def materialize_adapters_(self, device: torch.device | str) -> None:
        """Give A, B (and DoRA's magnitude) storage on `device` and initialise them, once W has values."""
        self.lora_A.to_empty(device=device)
        self.lora_B.to_empty(device=device)
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty_like(self.lora_magnitude_vector, device=device))
        self.reset_lora_parameters()

    def forward(self, x: Tensor) -> Tensor:
        result = self._base_forward(x)
        if self.merged or self.adapter_disabled:
            return result
        if self.use_dora:
            return (result + self._dora(x, result)).to(result.dtype)
        # Scaled on the rank-r intermediate: r numbers per token instead of out_features (forward
        # and backward); the same product as PEFT's B(A(x)) * scaling up to rounding.
        return result + self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)

    def _dora(self, x: Tensor, result: Tensor) -> Tensor:
        """PEFT's `DoraLinearLayer.forward`, operation for operation (so it is PEFT's to the bit):
        (m / ||W + s B A|| - 1) * (W x) + (m / ||W + s B A||) * B A x * s, norm detached."""
        x = x.to(self.lora_A.weight.dtype)  # PEFT runs the adapter path in the adapters' dtype
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result = result
        else:  # the W x of the correction term sees the same dropped-out x as B A x
            x = self.lora_dropout(x)
            base_result = None
        with torch.no_grad():  # the norm is a constant for backward (detached in PEFT)
            # B A as PEFT forms it, lora_B(lora_A(I)).T; lora_A(I) is A.T exactly (one product by 1 per entry)
            lora_weight = F.linear(self.lora_A.weight.T.contiguous(), self.lora_B.weight).T.to(x.dtype)
            weight = self.base_weight(x.dtype)
            weight_norm = torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype)
        mag_norm_scale = (self.lora_magnitude_vector / weight_norm).view(1, -1)
        lora_result = self.lora_B(self.lora_A(x))
        if base_result is not None:
            if self.bias is not None:
                base_result = base_result - self.bias  # the bias is not rescaled
        elif self.quantized:  # dequantised again in backward, not kept alive per layer
            base_result = self._base_forward(x, bias=False)
        else:
            base_result = F.linear(x, weight)
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling

    def delta_weight(self) -> Tensor:
        """(alpha / r) * B A, the [out, in] update that merging adds to W (before DoRA's rescaling)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into W in place; forward then costs one matmul. Idempotent."""
        if self.quantized:
            raise ValueError("LoRA: cannot merge into an NF4 base in place; merged_state_dict merges into the original high-precision weights")
        if not self.merged:
            magnitude = self.lora_magnitude_vector if self.use_dora else None
            self.weight.copy_(merge_weight(self.weight, self.lora_A.weight, self.lora_B.weight, self.scaling, magnitude).to(self.weight.dtype))
            self.merged = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}" + (", dora=True" if self.use_dora else "")


def merge_weight(base: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, magnitude: Tensor | None = None) -> Tensor:
    """The merged [out, in] weight in float32: W + s B A, and for DoRA (m / ||W + s B A||) (W + s B A)
    per output row (PEFT's merge: the rows then have norm m, as the forward used them)."""
    weight = base.float() + (lora_B.float() @ lora_A.float()) * scaling
    if magnitude is not None:
        weight = (magnitude.float() / torch.linalg.norm(weight, dim=1)).view(-1, 1) * weight
    return weight


class LazyWeight:
    """A tensor computed only when it is written: `.to(device, dtype)` calls `compute()`.

    Merging QLoRA adapters into the original base reads each base weight from checkpoint_dir; as
    lazy values of the merged state dict, `checkpoint.save_hf_checkpoint` (which uses only `shape`,
    `numel`, `is_meta`, `detach` and `to`) reads, merges and writes them one at a time, so the
    merged model never exists whole in memory.
    """

    is_meta = False

    def __init__(self, shape: torch.Size, dtype: torch.dtype, compute: Callable[[], Tensor]) -> None:
        self.shape, self.dtype, self.compute = torch.Size(shape), dtype, compute

    def numel(self) -> int:
        return self.shape.numel()

    def detach(self) -> LazyWeight:
        return self

    def to(self, *args, **kwargs) -> Tensor:
        return self.compute().to(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LazyWeight(shape={list(self.shape)}, dtype={self.dtype})"


def resolve_targets(attn_modules: Iterable[str], apply_to_mlp: bool = False, apply_to_output: bool = False) -> list[str]:
    """Config names (`q_proj` or Meta's `q`, `w1`, ...) -> the module names LoRA wraps."""
    targets = []
    for name in attn_modules:
        canonical = TARGET_ALIASES.get(name, name)
        if canonical not in ATTN_TARGETS:
            raise ValueError(f"lora_attn_modules: unknown module {name!r}; expected some of {list(ATTN_TARGETS)}")
        targets.append(canonical)
    if apply_to_mlp:
        targets += MLP_TARGETS
    if apply_to_output:
        targets.append(OUTPUT_TARGET)
    return list(dict.fromkeys(targets))  # keep order, drop repeats


def apply_lora(model: nn.Module, targets: Iterable[str], rank: int, alpha: float, dropout: float = 0.0, *, use_dora: bool = False, quantize_base: bool = False) -> list[str]:
    """Replace every `nn.Linear` whose name is in `targets` with a `LoRALinear` sharing its weight.

    The base weight object is reused (not copied), so this works on meta-device models before
    loading and on loaded models alike. Returns the qualified names of the wrapped layers.
    `quantize_base`: store each wrapped W as NF4 (QLoRA), layer by layer, before DoRA's magnitude is
    computed from it (as PEFT computes it from the dequantised weight). On a meta model the adapters
    stay on meta until `materialize_adapters_` (QLoRA loading: wrap, then load and quantise).
    """
    targets = set(targets)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                # Built on meta so no throw-away base weight is allocated, then given the layer's own
                # weight and real A, B on its device.
                lora = LoRALinear(child.in_features, child.out_features, rank, alpha, dropout, bias=child.bias is not None, device="meta", dtype=child.weight.dtype, use_dora=use_dora)
                lora.weight, lora.bias = child.weight, child.bias
                if quantize_base and child_name != OUTPUT_TARGET:  # transformers keeps lm_head unquantised
                    lora.quantize_base_()
                if not child.weight.is_meta:
                    lora.materialize_adapters_(child.weight.device)
                setattr(parent, child_name, lora)
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not wrapped:
        raise ValueError(f"LoRA targets {sorted(targets)} match no linear layer of the model")
    return wrapped


def quantize_linears(model: nn.Module, skip: Iterable[str] = (OUTPUT_TARGET,)) -> list[str]:
    """QLoRA's frozen base: every plain `nn.Linear` (those without an adapter) but the ones named in
    `skip` (the output head, which transformers' 4-bit loading also keeps) becomes a `QLinear` storing
    its weight in NF4, one layer at a time; on a meta model, placeholders that `load_weights` fills.
    Returns the names of the quantised layers."""
    skip = set(skip)
    quantized = []
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, LoRALinear):  # its lora_A / lora_B train
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child_name not in skip:
                layer = QLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta", dtype=child.weight.dtype)
                layer.weight, layer.bias = child.weight, child.bias
                layer.quantize_base_()
                setattr(parent, child_name, layer)
                quantized.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return quantized


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze everything but the adapters: the base then gets no gradients and no optimiser state."""
    for name, param in model.named_parameters():
        param.requires_grad = is_lora_key(name)


LORA_KEYS = ("lora_A.", "lora_B.", "lora_magnitude_vector")


def store_frozen_linears_(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen `nn.Linear` weight (LoRA's base) in `dtype`, but a head tied to the
    embedding (a copy would untie them); returns how many. Under autocast in `dtype` these are the
    bits each product uses anyway, so a frozen weight needs no fp32 copy (see the recipes'
    `store_frozen_linears_in_compute_dtype`)."""
    head, tied = getattr(model, "lm_head", None), bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    count = 0
    for module in model.modules():
        if module is head and tied:
            continue
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
            count += 1
    return count


def is_lora_key(name: str) -> bool:
    """An adapter tensor: lora_A / lora_B weights or DoRA's magnitude (PEFT's names)."""
    return any(f".{k}" in name or name.startswith(k) for k in LORA_KEYS)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, keyed as in `model.state_dict()`."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def quantized_base_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """`<layer>.weight` -> [out, in] of every NF4 base: the checkpoint tensors `load_weights` quantises
    as they arrive (the layer's own `weight` is an empty placeholder)."""
    return {f"{name}.weight": m.base_nf4.shape for name, m in model.named_modules() if isinstance(m, QLinear) and m.quantized}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and turn each `LoRALinear` back into a plain
    `nn.Linear`, so the state dict is exactly the base model's (ready for a Hugging Face export)."""
    for name, lora in lora_modules(model).items():
        lora.merge()
        linear = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        linear.weight, linear.bias = lora.weight, lora.bias
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, linear)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module, state_dict: dict[str, Tensor] | None = None, base_weights: Callable[[str], Tensor] | None = None) -> dict[str, Tensor]:
    """The base model's state dict with every adapter folded in, leaving `model` untouched.

    Only the wrapped weights are new tensors (W + (alpha/r) B A, DoRA-rescaled, computed in fp32
    then cast back); every other entry is the model's own tensor, so exporting a 7B LoRA model costs
    memory only for the few adapted matrices, not a second copy of the model. `state_dict` supplies
    the tensors when the model's own are sharded (gathered by `sharding.gather_state_dict`); the
    model still gives each layer's scaling.

    NF4 (QLoRA) bases: `base_weights(key)` reads the original high-precision weight (from
    checkpoint_dir), and the merged weight is a `LazyWeight`, read and merged when written, one at a
    time. Without `base_weights` (a random-init base, never stored in high precision) the merge
    uses the dequantised NF4 weight.
    """
    loras = {name: lora for name, lora in lora_modules(model).items() if not lora.merged}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QLinear) and m.quantized}
    state = model.state_dict() if state_dict is None else state_dict
    merged = {}
    for key, value in state.items():
        if is_lora_key(key):
            continue
        module_name, _, param_name = key.rpartition(".")
        if param_name == "weight" and module_name in quantized:  # the empty placeholder of an NF4 base
            layer = quantized[module_name]
            read = (lambda k=key: base_weights(k)) if base_weights is not None else layer.base_weight
            adapter = _adapter(loras.get(module_name), state, module_name)
            dtype = layer.base_dtype if adapter is None else torch.promote_types(layer.base_dtype, adapter[0].dtype)
            value = LazyWeight(layer.base_nf4.shape, dtype, lambda read=read, adapter=adapter, dtype=dtype: _merge(read(), adapter, dtype))
        elif param_name == "weight" and module_name in loras:
            adapter = _adapter(loras[module_name], state, module_name)
            # In the wider of the base's and the adapter's dtypes: a base stored in bf16 under
            # bf16-mixed (see FinetuneModule) still gets an fp32 merge of its fp32 adapter.
            value = _merge(value, adapter, torch.promote_types(value.dtype, adapter[0].dtype))
        merged[key] = value
    return merged


def _adapter(lora: LoRALinear | None, state: dict[str, Tensor], name: str) -> tuple[Tensor, Tensor, float, Tensor | None] | None:
    """(A, B, scaling, DoRA magnitude or None) of layer `name` from `state`; None without an adapter."""
    if lora is None:
        return None
    magnitude = state[f"{name}.lora_magnitude_vector"] if lora.use_dora else None
    return state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"], lora.scaling, magnitude


def _merge(base: Tensor, adapter: tuple[Tensor, Tensor, float, Tensor | None] | None, dtype: torch.dtype) -> Tensor:
    return (base if adapter is None else merge_weight(base, *adapter)).to(dtype)


@contextmanager
def adapters_off(layers: Iterable) -> Iterator[None]:
    """Inside, each of `layers` (anything with an `adapter_disabled` flag: `LoRALinear`, an expert adapter)
    computes its base alone; each layer's own state is restored on exit."""
    layers = list(layers)
    before = [layer.adapter_disabled for layer in layers]
    for layer in layers:
        layer.adapter_disabled = True
    try:
        yield
    finally:
        for layer, state in zip(layers, before, strict=True):
            layer.adapter_disabled = state


def disable_adapters(model: nn.Module) -> AbstractContextManager[None]:
    """Inside, every LoRA layer of `model` computes its base layer only (PEFT's `disable_adapter()`):
    the base model without a second copy, e.g. DPO's reference. Restores each layer's state on exit."""
    return adapters_off(lora_modules(model).values())
