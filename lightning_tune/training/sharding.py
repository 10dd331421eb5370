"""FSDP2 sharding of the model, under Lightning's `ModelParallelStrategy` (`--trainer.strategy fsdp2`).

The recipes build the model on the meta device and `build_sharded` shards it here (each decoder layer
its own unit, then the root: embeddings, final norm, output head), and only then allocates: every rank
holds 1/N of each parameter, and `checkpoint.load_weights` copies each checkpoint tensor's rows for
this rank into its shard, one tensor at a time. So a 70B model never exists whole in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from lightning_tune.checkpoint import load_shard_
from lightning_tune.model import CausalLM

FSDP2 = "fsdp2"


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as plain FSDP2: every process is one data-parallel shard.

    The data-parallel size is always devices x num_nodes (no tensor parallelism), so one config runs
    on 1, 8 or 64 GPUs by changing only `trainer.devices` / `trainer.num_nodes`. Registered with
    Lightning as `--trainer.strategy fsdp2`; the recipes shard the model in `configure_model`.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout) -> None:
        """
        Args:
            save_distributed_checkpoint: Each rank writes its own shard (a checkpoint directory); False gathers one file on rank 0.
            process_group_backend: nccl on GPUs, gloo on CPUs by default.
            timeout: For collective operations.
        """
        super().__init__("auto", 1, save_distributed_checkpoint, process_group_backend, timeout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # known once Lightning set devices and nodes
        super().setup_environment()


if FSDP2 not in StrategyRegistry:
    StrategyRegistry.register(FSDP2, FSDP2Strategy, description="FSDP2 over all devices and nodes (lightning_tune)")


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for the Trainer's `precision`.

    `bf16-mixed`: fp32 sharded parameters (the optimiser's master copy), all-gathered and computed
    in bf16, gradients reduced in fp32. `bf16-true` / `16-true` / `32-true`: parameters already have
    the compute dtype (Lightning creates them in it), so nothing to cast.
    """
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: CausalLM, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy) -> None:
    """Shard `model` in place over `mesh` (1-D, data parallel): one FSDP unit per decoder layer.

    Per-layer units mean only one layer's full parameters exist at a time in forward and backward
    (plus the next one's, prefetched). The last layer is not resharded after forward because
    backward needs it again at once.
    """
    layers = model.model.layers
    for index, layer in enumerate(layers):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshards_after_forward(index, len(layers)))
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    # Training calls `hidden_states` (the head runs only on labelled positions), not `forward`.
    register_fsdp_forward_method(model, "hidden_states")


def reshards_after_forward(index: int, num_layers: int) -> bool:
    """Layer `index` gives its gathered parameters back after forward, except the last (backward needs it at once)."""
    return index < num_layers - 1


@contextmanager
def gathered_for_decoding(model: CausalLM) -> Iterator[None]:
    """Every parameter of a sharded `model` gathered for the duration, then sharded again as `shard_model` left
    it; a model that is not sharded is left as it is.

    Decoding (GRPO's rollouts) calls the decoder's pieces directly and one step per token, and each rank stops
    when its own rows have ended: gathered per layer per step, the ranks' collectives would not pair up (and
    cost an all-gather of every layer per token). So the whole model is gathered once (a whole unsharded
    copy per rank for the rollout) and no unit reshards until the end. A one-token pass through the root
    comes first: FSDP2 makes the first unit that runs forward the root.
    """
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if not units:
        yield
        return
    with torch.no_grad():
        model.hidden_states(torch.zeros(1, 1, dtype=torch.long, device=model.lm_head.weight.device))
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        layers = model.model.layers
        for index, layer in enumerate(layers):
            if isinstance(layer, FSDPModule):
                layer.set_reshard_after_forward(reshards_after_forward(index, len(layers)), recurse=False)
        for unit in units:
            unit.reshard()


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def gather_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict on CPU, on rank 0 only (other ranks get `{}`).

    Every rank must call this: each parameter is all-gathered in turn and copied to rank 0's CPU
    memory, so GPU memory grows by one parameter at a time. Unsharded models return their own
    state dict (every rank holds a full replica under DDP).
    """
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def init_like_unsharded_(param: Tensor, init: Callable[[Tensor], object]) -> None:
    """Initialise `param` in place as `init` would initialise it unsharded.

    A sharded parameter is drawn whole (one tensor at a time, on this rank's device, from the
    generator every rank seeded alike) and this rank keeps its rows: the same values as a single
    process, so FSDP runs start where single-device and DDP runs do.
    """
    if isinstance(param, DTensor):
        full = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
        init(full)
        load_shard_(param, full)
    else:
        with torch.no_grad():
            init(param)


def build_sharded(
    model: CausalLM,
    mesh: DeviceMesh,
    precision: str,
    device: torch.device,
    adapt: Callable[[CausalLM], None],
    materialize: Callable[..., None],
    reset_adapters: Callable[[CausalLM], None],
) -> None:
    """FSDP2's build of a model still on the meta device: adapt and shard it there, then each rank
    allocates and fills only its shards.

    `adapt(model)` is the recipe's (what trains: adapters, frozen weights). `materialize(model,
    init_apply=init)` fills the base weights (from a checkpoint, or a random init drawn through `init`:
    each weight whole, as unsharded, this rank keeping its rows; see `CausalLM.init_weights`);
    adapters are `reset_adapters(model)`'s job, the same draws in the same order as on one device.
    """
    base_names = {name for name, _ in model.named_parameters()}
    adapt(model)
    shard_model(model, mesh, mixed_precision_policy(precision))
    model.to_empty(device=device)
    adapters = {id(p) for name, p in model.named_parameters() if name not in base_names}

    def init_base(weight: Tensor, init: Callable[[Tensor], object]) -> None:
        if id(weight) not in adapters:
            init_like_unsharded_(weight, init)

    materialize(model, init_apply=init_base)
    reset_adapters(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    rank_zero_info(f"FSDP2: {len(model.model.layers)} decoder layers sharded over {mesh.size()} processes; rank 0 holds {local:,} of {total:,} parameter elements")
