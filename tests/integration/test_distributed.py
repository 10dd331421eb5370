"""Scale-out on a CPU: 2 processes (gloo) under DDP and FSDP2 train exactly as 1 process with the same global batch.

Each run is a real `python -m lightning_tune fit` whose second process Lightning launches itself,
from a base checkpoint on disk, so the FSDP2 runs also exercise sharded loading.
"""

from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_tune.checkpoint import save_hf_checkpoint
from lightning_tune.data import InstructDataModule
from lightning_tune.data.sampler import LengthGroupedSampler
from lightning_tune.model import Llama, llama2_config

STEPS = 3
GLOBAL_BATCH = 8
# The equivalence runs train with plain SGD, not the configs' AdamW: a weight then moves by -sum_t lr_t g_t, linear in the
# gradients, so the runs' weights differ only as much as their gradients do. Those differ by the order fp32 sums are
# taken in (the tokens of a batch, the two ranks' halves in the all-reduce, sharded matmuls): a sum of n terms
# reordered changes by at most about n * u of the terms' magnitude (u = 2^-24 ~ 6e-8); the longest sums here are over a
# global batch's <= 8 * 64 tokens, n * u <= 3e-5. AdamW divides each step by sqrt of the second moment, so an element
# whose gradient is near zero (rounding noise) moves by up to ~lr per step in either direction: 2.3e-6 absolute (5e-4
# relative) differences on another machine, which no tolerance tied to the arithmetic of the equivalence would allow.
LR = 0.1  # SGD takes steps of lr * g: large enough that the weights move by far more than the tolerance below
EQUIVALENCE = ["--model.optimizer", "torch.optim.SGD", "--model.lr", str(LR)]
# Weights are compared by their change from the base checkpoint (merged/ minus base: what training did), element by
# element within REORDER_RTOL of the largest change in the tensor (the gradient terms of one element are of the size
# of the tensor's larger gradients: the n * u bound above with room for a chain of a few such sums), plus one fp32
# rounding of each stored weight (merged = base + update is rounded once in each run).
# Losses (means over the same tokens, summed in another order) get the same relative bound.
REORDER_RTOL = 1e-4
TIMEOUT = 1800  # a hang guard only: a fit takes ~10-30 s alone, minutes under a load of 8 on 2 cores
STRATEGIES = {
    "single": [],
    "ddp": ["--trainer.strategy", "ddp", "--trainer.devices", "2"],
    "fsdp": ["--trainer.strategy", "fsdp2", "--trainer.devices", "2"],
    # Recomputing each layer in backward changes no number.
    "fsdp-checkpointing": ["--trainer.strategy", "fsdp2", "--trainer.devices", "2", "--model.activation_checkpointing", "true"],
    "fsdp-bf16-mixed": ["--trainer.strategy", "fsdp2", "--trainer.devices", "2", "--trainer.precision", "bf16-mixed"],
}


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama 2 (demo vocabulary) saved as a Hugging Face directory."""
    torch.manual_seed(0)
    model = Llama(llama2_config("tiny_llama2", vocab_size=512))
    model.init_weights()
    return save_hf_checkpoint(model, model.config, tmp_path_factory.mktemp("base") / "tiny")


def fit_args(config: str, root: Path, base: Path, processes: int) -> list[str]:
    """`fit` shrunk to STEPS steps from `base`, per-step CSV metrics; batch = GLOBAL_BATCH / processes."""
    return [
        "fit", "--config", config,
        "--model.checkpoint_dir", str(base), "--model.model_args", "{}", "--model.warmup_steps", "1",
        "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", str(STEPS),
        "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.callbacks=[]", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--data.batch_size", str(GLOBAL_BATCH // processes), *EQUIVALENCE,
    ]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a 2-core machine


def fit(config: str, strategy: str, root: Path, base: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """One `python -m lightning_tune fit`; under ddp/fsdp Lightning launches the second process itself."""
    processes = 1 if strategy == "single" else 2
    args = [sys.executable, "-m", "lightning_tune", *fit_args(config, root, base, processes), *STRATEGIES[strategy], *extra]
    result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fit_on_two_nodes(launcher: str, root: Path, base: Path) -> None:
    """Two single-process "nodes" on this machine (--trainer.num_nodes 2 --trainer.devices 1, fsdp2), started
    the way a cluster starts them: by torchrun on each node, or by srun (its SLURM_* variables, set here)."""
    port = free_port()
    args = fit_args("tiny_lora.yaml", root, base, 2) + ["--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "fsdp2"]
    procs = []
    for node in range(2):
        if launcher == "torchrun":
            command = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "lightning_tune", *args,
            ]  # fmt: skip
            env = ENV
        else:
            command = [sys.executable, "-m", "lightning_tune", *args]
            env = {
                **ENV, "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "alpaca", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
                "SLURM_NNODES": "2", "SLURM_NODELIST": "127.0.0.1", "SLURM_PROCID": str(node), "SLURM_LOCALID": "0",
                "SLURM_NODEID": str(node), "MASTER_PORT": str(port),
            }  # fmt: skip
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=TIMEOUT)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    assert "sharded over 2 processes" in outputs[0]  # (each process alone would hang waiting for a world of 2)


def assert_same_training(run: Path, reference: Path, base: Path) -> None:
    """merged/ of `run` changed each base weight as `reference`'s did, within the reordering bound above."""
    eps = torch.finfo(torch.float32).eps
    start = load_file(base / "model.safetensors")
    want, got = load_file(reference / "merged" / "model.safetensors"), load_file(run / "merged" / "model.safetensors")
    assert got.keys() == want.keys() == start.keys()
    moved = 0.0
    for key in want:
        change = want[key] - start[key]
        tolerance = REORDER_RTOL * change.abs().max() + eps * torch.maximum(want[key].abs(), got[key].abs())
        excess = (got[key] - want[key]).abs() - tolerance
        assert excess.max() <= 0, f"{run.name}: {key} differs by {(got[key] - want[key]).abs().max():.3g} (allowed {tolerance.max():.3g})"
        moved = max(moved, float(change.abs().max()))
    assert moved > 1e3 * eps, "training barely moved the weights: the comparison would check nothing"


def metrics(root: Path) -> dict[str, list[float]]:
    """train_loss per step and the final val_loss from the one CSV log rank 0 wrote."""
    versions = sorted((root / "logs").iterdir())
    assert [v.name for v in versions] == ["version_0"], "logs must be written once, by rank 0"
    rows = list(csv.DictReader((versions[0] / "metrics.csv").open()))
    return {
        "train_loss": [float(r["train_loss"]) for r in rows if r.get("train_loss")],
        "val_loss": [float(r["val_loss"]) for r in rows if r.get("val_loss")],
    }


@pytest.mark.parametrize(("config", "export"), [("tiny_lora.yaml", "adapter/adapter_model.safetensors"), ("tiny_full.yaml", "merged/model.safetensors")])
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path: Path, base_checkpoint: Path, config: str, export: str) -> None:
    """Loss curve, validation loss and exported weights of DDP and FSDP2 (2 processes x batch 4) equal a
    single process's (batch 8) within fp32 tolerance: the ranks saw disjoint halves of each global batch."""
    strategies = ["single", "ddp", "fsdp"] if config == "tiny_lora.yaml" else ["single", "fsdp-checkpointing"]
    runs = {s: tmp_path / s for s in strategies}
    outputs = {s: fit(config, s, root, base_checkpoint) for s, root in runs.items()}
    for strategy in strategies[1:]:  # under FSDP each rank holds half of every parameter, never the whole model
        held = re.search(r"sharded over 2 processes; rank 0 holds ([\d,]+) of ([\d,]+) parameter elements", outputs[strategy].stderr + outputs[strategy].stdout)
        assert (held is not None) == strategy.startswith("fsdp")
        if held:
            local, total = (int(n.replace(",", "")) for n in held.groups())
            assert total / 2 <= local <= total / 2 + 1024, (local, total)  # half, plus rounding of odd rows

    want = metrics(runs["single"])
    assert len(want["train_loss"]) == STEPS and len(want["val_loss"]) == 1
    expected = load_file(runs["single"] / export)
    for strategy in strategies[1:]:
        got = metrics(runs[strategy])
        torch.testing.assert_close(torch.tensor(got["train_loss"]), torch.tensor(want["train_loss"]), rtol=REORDER_RTOL, atol=0)
        torch.testing.assert_close(torch.tensor(got["val_loss"]), torch.tensor(want["val_loss"]), rtol=REORDER_RTOL, atol=0)
        assert load_file(runs[strategy] / export).keys() == expected.keys()
        assert_same_training(runs[strategy], runs["single"], base_checkpoint)


def test_full_dpo_with_a_precomputed_reference_trains_sharded_as_one_process(tmp_path: Path, base_checkpoint: Path) -> None:
    """Full DPO, the reference precomputed (each rank scores its share of the pairs, an odd count so
    one share is padded; the scores are gathered): under FSDP2 on 2 processes it trains as one
    process with a frozen reference copy does, same losses and weights within the reordering bound.
    The copy itself cannot be sharded (refused)."""
    from lightning_tune.data.base import DEMO_TOKENIZER
    from lightning_tune.data.preference import DEMO_PREFERENCES

    # 401 pairs (the demo's and its first again): the ranks score 201 and 200, the shorter padded.
    pairs = DEMO_PREFERENCES.read_text().splitlines()
    (tmp_path / "pairs.jsonl").write_text("\n".join([*pairs, pairs[0]]) + "\n")
    full = ("--model.method", "full", "--data.source", str(tmp_path / "pairs.jsonl"), "--data.tokenizer_path", str(DEMO_TOKENIZER))
    runs = {"single": tmp_path / "single", "fsdp": tmp_path / "fsdp"}
    fit("tiny_dpo.yaml", "single", runs["single"], base_checkpoint, full)
    fit("tiny_dpo.yaml", "fsdp", runs["fsdp"], base_checkpoint, (*full, "--model.precompute_reference", "true"))
    want, got = metrics(runs["single"]), metrics(runs["fsdp"])
    assert len(want["train_loss"]) == STEPS and want["train_loss"][-1] < want["train_loss"][0]
    torch.testing.assert_close(torch.tensor(got["train_loss"]), torch.tensor(want["train_loss"]), rtol=REORDER_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(got["val_loss"]), torch.tensor(want["val_loss"]), rtol=REORDER_RTOL, atol=0)
    assert_same_training(runs["fsdp"], runs["single"], base_checkpoint)


def test_dora_trains_sharded_as_one_process(tmp_path: Path, base_checkpoint: Path) -> None:
    """DoRA under FSDP2 (2 processes): each rank sets the magnitudes of its own rows of W (FSDP2 shards
    W and the magnitude vector by the same rows), the forward sees the gathered W; losses, the
    validation loss and the exported adapter equal one process's within the reordering bound."""
    dora = ("--model.use_dora", "true")
    runs = {"single": tmp_path / "single", "fsdp": tmp_path / "fsdp"}
    for strategy, root in runs.items():
        fit("tiny_lora.yaml", strategy, root, base_checkpoint, dora)
    want, got = metrics(runs["single"]), metrics(runs["fsdp"])
    assert len(want["train_loss"]) == STEPS
    torch.testing.assert_close(torch.tensor(got["train_loss"]), torch.tensor(want["train_loss"]), rtol=REORDER_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(got["val_loss"]), torch.tensor(want["val_loss"]), rtol=REORDER_RTOL, atol=0)
    expected = load_file(runs["single"] / "adapter" / "adapter_model.safetensors")
    adapter = load_file(runs["fsdp"] / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys() and any("lora_magnitude_vector" in k for k in expected)
    assert_same_training(runs["fsdp"], runs["single"], base_checkpoint)


def test_grpo_under_fsdp2_trains_as_under_ddp(tmp_path: Path, base_checkpoint: Path) -> None:
    """GRPO on 2 processes. Under FSDP2 each rollout gathers the whole model once (each rank stops decoding when
    its own completions end, so decoding must issue no collective), then trains sharded. Each rank samples its
    own prompts with its own seed (optimiser step, micro-batch, rank) under either strategy, so the FSDP2 run
    samples what the DDP run samples: the same rewards, and losses and exported weights within the reordering
    bound (SGD, as above)."""
    runs = {"ddp": tmp_path / "ddp", "fsdp": tmp_path / "fsdp"}
    for strategy, root in runs.items():
        fit("tiny_grpo.yaml", strategy, root, base_checkpoint)

    def logged(root: Path) -> dict[str, list[float]]:
        rows = list(csv.DictReader(next((root / "logs").glob("version_*/metrics.csv")).open()))
        return {name: [float(r[name]) for r in rows if r.get(name)] for name in ("reward", "train_loss", "completions/mean_length")}

    want, got = logged(runs["ddp"]), logged(runs["fsdp"])
    assert len(want["reward"]) == STEPS and want["reward"] == got["reward"] and want["completions/mean_length"] == got["completions/mean_length"]
    loss_scale = max(abs(v) for v in want["train_loss"])
    assert all(abs(g - w) <= REORDER_RTOL * loss_scale for g, w in zip(got["train_loss"], want["train_loss"], strict=True)), (got, want)
    assert_same_training(runs["fsdp"], runs["ddp"], base_checkpoint)


def test_ranks_split_each_global_batch(tmp_path: Path) -> None:
    """The data module under a 2-process Trainer: rank r with batch b gets indices that, batch by batch,
    together form the 1-process batch of 2b (no Trainer: one process)."""
    from types import SimpleNamespace

    def sampler_order(batch_size: int, rank: int | None) -> list[int]:
        data = InstructDataModule(source="demo", cache_dir=str(tmp_path), batch_size=batch_size, max_seq_len=64)
        if rank is not None:  # what Lightning's DDP/FSDP strategies report to the data module
            data.trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank}))
        return list(data.train_dataloader().sampler)

    one = sampler_order(8, None)
    ranks = [sampler_order(4, r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == (len(one) + 1) // 2
    assert set(ranks[0]).isdisjoint(ranks[1])
    for step in range(len(one) // 8):
        assert sorted(ranks[0][step * 4 : step * 4 + 4] + ranks[1][step * 4 : step * 4 + 4]) == sorted(one[step * 8 : step * 8 + 8])


def test_length_grouped_sampler_splits_each_global_batch() -> None:
    """Grouped by length across ranks: the 2 ranks' batches of a step are one global batch of the
    1-process grouped order (with the global batch size), and every rank gets the same number of samples."""
    lengths = [(i * 37) % 101 for i in range(203)]  # odd count: one index is repeated to even the ranks out
    single = LengthGroupedSampler(lengths, batch_size=8, seed=3, group_batches=4).order(0)
    ranks = [LengthGroupedSampler(lengths, batch_size=4, seed=3, group_batches=4, num_replicas=2, rank=r) for r in range(2)]
    orders = [r.order(0) for r in ranks]
    assert len(orders[0]) == len(orders[1]) == len(ranks[0]) == 102
    for step in range(len(lengths) // 8):
        got = orders[0][step * 4 : step * 4 + 4] + orders[1][step * 4 : step * 4 + 4]
        assert sorted(got) == sorted(single[step * 8 : step * 8 + 8])


def test_fsdp_run_killed_and_resumed_from_its_sharded_checkpoint_equals_uninterrupted(tmp_path: Path) -> None:
    """FSDP2 saves sharded (torch.distributed.checkpoint) directories; a run SIGKILLed after step 2 and resumed with
    --ckpt_path last continues the loss curve and ends with the same adapter as the uninterrupted run."""
    from kill_helpers import fit_args, run_fit

    fsdp = STRATEGIES["fsdp"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_fit(fit_args(straight, "run", max_steps=4, extra=fsdp), cwd=tmp_path)
    killer = ["--trainer.callbacks+", "kill_helpers.KillAtStep", "--trainer.callbacks.step", "2"]
    run_fit(fit_args(broken, "run", max_steps=4, extra=fsdp + killer), killed=True, cwd=tmp_path)
    last = broken / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file()  # one shard file per rank plus the metadata
    run_fit(fit_args(broken, "resumed", max_steps=4, extra=fsdp + ["--ckpt_path", "last"]), cwd=tmp_path)

    want = metrics_of(straight, "run")
    before, after = metrics_of(broken, "run"), metrics_of(broken, "resumed")
    assert len(after) == 2, after  # resumed after step 2, not from scratch
    merged = {**before, **after}
    for step, loss in want.items():
        assert abs(merged[step] - loss) <= 1e-5 * abs(loss), (step, merged[step], loss)
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    got = load_file(broken / "adapter" / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)

    # The sharded checkpoint exports in one process, as a .ckpt does: the adapter it holds is the one the run exported.
    from lightning_tune.cli.export import export_command

    export_command(["--ckpt_path", str(last), "--format", "peft", "--output", str(tmp_path / "exported")])
    exported = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    for key, value in load_file(broken / "adapter" / "adapter_model.safetensors").items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0)


def metrics_of(root: Path, version: str) -> dict[int, float]:
    with (root / "logs" / version / "metrics.csv").open() as file:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(file) if row.get("train_loss")}


@pytest.fixture(scope="module")
def single_lora_run(tmp_path_factory: pytest.TempPathFactory, base_checkpoint: Path) -> Path:
    root = tmp_path_factory.mktemp("single")
    fit("tiny_lora.yaml", "single", root, base_checkpoint)
    return root


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_nodes_launched_by_torchrun_or_slurm_train_as_one_process(tmp_path: Path, base_checkpoint: Path, single_lora_run: Path, launcher: str) -> None:
    """Multi-node through Lightning's own cluster environments: the same config, changed only in trainer.*
    (num_nodes 2, devices 1, fsdp2), started per node by torchrun or by SLURM, trains as one process does."""
    fit_on_two_nodes(launcher, tmp_path / launcher, base_checkpoint)
    want, got = metrics(single_lora_run), metrics(tmp_path / launcher)
    torch.testing.assert_close(torch.tensor(got["train_loss"]), torch.tensor(want["train_loss"]), rtol=REORDER_RTOL, atol=0)
    assert_same_training(tmp_path / launcher, single_lora_run, base_checkpoint)


def test_fsdp_bf16_mixed_trains_close_to_fp32(tmp_path: Path, base_checkpoint: Path, single_lora_run: Path) -> None:
    """bf16-mixed under FSDP2 (bf16 all-gathers and compute, fp32 shards and gradient reduction) stays within
    bf16 rounding of the fp32 single-process loss curve and exports fp32 adapters."""
    fit("tiny_lora.yaml", "fsdp-bf16-mixed", tmp_path / "bf16", base_checkpoint)
    want, got = metrics(single_lora_run), metrics(tmp_path / "bf16")
    torch.testing.assert_close(torch.tensor(got["train_loss"]), torch.tensor(want["train_loss"]), rtol=2e-2, atol=0)
    adapter = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapter.values())


def test_fsdp1_with_several_processes_is_refused_with_the_fix() -> None:
    """Lightning's FSDPStrategy would load the whole model in every process: one line naming fsdp2 instead."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_tune.recipes import LoRAFinetune

    module = LoRAFinetune(model="tiny_llama2")
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=8)
    with pytest.raises(ValueError, match=r"^trainer\.strategy: FSDPStrategy .* use --trainer\.strategy fsdp2") as err:
        module.configure_model()
    assert "\n" not in str(err.value)
    assert module.model is None


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen3-MoE (8 experts, 2 per token; demo vocabulary) saved as a Hugging Face directory."""
    from lightning_tune.families import model_config
    from lightning_tune.model import CausalLM

    torch.manual_seed(0)
    model = CausalLM(model_config("tiny_qwen3_moe", vocab_size=512))
    model.init_weights(std=0.1)  # routing decided by margins far above the reordering noise
    return save_hf_checkpoint(model, model.config, tmp_path_factory.mktemp("moe") / "tiny")


def test_moe_with_expert_adapters_trains_sharded_as_one_process(tmp_path: Path, moe_checkpoint: Path) -> None:
    """LoRA on a mixture's experts (tiny_moe.yaml) under FSDP2 on 2 processes: each rank holds half the experts
    of each stack and half of their adapters, the forward gathers them; the losses and the exported adapter and
    merged model equal one process's within the reordering bound."""
    runs = {"single": tmp_path / "single", "fsdp": tmp_path / "fsdp"}
    for strategy, root in runs.items():
        fit("tiny_moe.yaml", strategy, root, moe_checkpoint)
    want, got = metrics(runs["single"]), metrics(runs["fsdp"])
    assert len(want["train_loss"]) == STEPS
    torch.testing.assert_close(torch.tensor(got["train_loss"]), torch.tensor(want["train_loss"]), rtol=REORDER_RTOL, atol=0)
    expected = load_file(runs["single"] / "adapter" / "adapter_model.safetensors")
    adapter = load_file(runs["fsdp"] / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys() and any(k.endswith("mlp.experts.base_layer.lora_A.weight") for k in expected)
    assert_same_training(runs["fsdp"], runs["single"], moe_checkpoint)


def test_fsdp_random_init_equals_one_process(tmp_path: Path) -> None:
    """Without a checkpoint (the demos), FSDP2 draws each weight whole and keeps its shard: the same
    model, and so the same loss curve, as one process with the same seed."""
    runs = {}
    for strategy in ("single", "fsdp"):
        root = tmp_path / strategy
        args = [arg for arg in fit_args("tiny_full.yaml", root, tmp_path, 1 if strategy == "single" else 2)]
        args = args[: args.index("--model.checkpoint_dir")] + args[args.index("--model.model_args") + 2 :]  # random init, vocab 512
        result = subprocess.run([sys.executable, "-m", "lightning_tune", *args, *STRATEGIES[strategy]], capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[strategy] = metrics(root)
    torch.testing.assert_close(torch.tensor(runs["fsdp"]["train_loss"]), torch.tensor(runs["single"]["train_loss"]), rtol=REORDER_RTOL, atol=0)
