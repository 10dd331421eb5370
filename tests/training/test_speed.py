"""Speed options change speed only: chunked head + loss equals the plain one (value and gradients),
LoRA's frozen base gets no gradients, length-grouped batching keeps every sample once and resumes
mid-epoch, bf16 precisions run, compile is opt-in with a warning."""

from __future__ import annotations

import logging

import lightning
import pytest
import torch
import torch.nn.functional as F

from lightning_tune.data import InstructDataModule, LengthGroupedSampler
from lightning_tune.recipes.sft import FullFinetune, LoRAFinetune
from lightning_tune.training.loss import linear_cross_entropy_sum

TINY = {"vocab_size": 512, "num_layers": 2, "embed_dim": 64, "num_heads": 4, "num_kv_heads": 2, "intermediate_dim": 128}


def reference_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_chunked_head_loss_and_gradients_equal_unchunked(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(50, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_size)
    (loss * 0.37).backward()  # a non-unit upstream gradient, as after Lightning's scaling
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = reference_loss(hidden, weight, targets)
    (expected * 0.37).backward()
    torch.testing.assert_close(loss, expected)  # fp32 tolerances: only the summation order differs
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], weight.grad)


def test_chunked_head_frozen_weight_and_no_grad():
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(100, 16)  # frozen (LoRA's head): no weight gradient is computed
    targets = torch.randint(0, 100, (20,))
    linear_cross_entropy_sum(hidden, weight, targets, 6).backward()
    expected_grad = torch.autograd.grad(reference_loss(hidden, weight, targets), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected_grad)
    with torch.no_grad():  # validation: value only
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, targets, 6), reference_loss(hidden, weight, targets))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy_sum(hidden, weight, targets, 0)


def test_chunked_head_under_bf16_autocast_matches_autocast_linear():
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(200, 32, requires_grad=True)
    targets = torch.randint(0, 200, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy_sum(hidden, weight, targets, 16)
        expected = reference_loss(hidden, weight, targets)
    got = torch.autograd.grad(loss, (hidden, weight))
    want = torch.autograd.grad(expected, (hidden, weight))
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def build(recipe_cls, **kwargs):
    torch.manual_seed(0)
    module = recipe_cls(model_name="tiny_llama2", model_args=TINY, export=False, **kwargs)
    module.configure_model()
    return module


def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 512, (3, 12), generator=generator)
    labels = input_ids.clone()
    labels[:, :5] = -100  # masked prompt
    labels[1, 9:] = -100  # padding
    return {"input_ids": input_ids, "labels": labels}


@pytest.mark.parametrize("recipe_cls", [FullFinetune, LoRAFinetune])
def test_recipe_loss_and_gradients_do_not_depend_on_chunking(recipe_cls):
    results = []
    for chunk in (0, 4):
        module = build(recipe_cls, loss_chunk_size=chunk)
        if recipe_cls is LoRAFinetune:  # non-zero B so adapter gradients reach A too
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.1)
        loss, tokens = module.loss_sum(batch())
        loss.backward()
        results.append((loss.detach(), tokens, {n: p.grad for n, p in module.named_parameters() if p.requires_grad}))
    (loss0, tokens0, grads0), (loss1, tokens1, grads1) = results
    assert tokens0 == tokens1 == 7 + 4 + 7  # labelled targets after the shift
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], msg=name)


def test_lora_base_is_frozen_and_gets_no_gradient():
    module = build(LoRAFinetune, loss_chunk_size=4)
    loss, _ = module.loss_sum(batch())
    loss.backward()
    for name, p in module.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name


def test_bad_chunk_size_fails_in_init():
    with pytest.raises(ValueError, match="loss_chunk_size"):
        FullFinetune(model_name="tiny_llama2", loss_chunk_size=-1)


def test_compile_is_opt_in_and_warns(caplog):
    module = build(LoRAFinetune)
    assert all(layer._compiled_call_impl is None for layer in module.model.model.layers)
    module = build(LoRAFinetune, compile=True)
    with caplog.at_level(logging.WARNING):
        module.on_fit_start()  # nn.Module.compile is lazy: nothing compiles until the first call
    assert all(layer._compiled_call_impl is not None for layer in module.model.model.layers)
    assert "first steps" in caplog.text and "slow" in caplog.text
    assert set(module.state_dict()) == set(build(LoRAFinetune).state_dict())  # keys unchanged


# ---- length-grouped batching -------------------------------------------------------------------


def test_length_grouped_sampler_groups_lengths_and_keeps_every_sample():
    lengths = [int(x) for x in torch.randint(5, 300, (203,), generator=torch.Generator().manual_seed(3))]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=1, group_batches=10)
    order = list(sampler)
    assert sorted(order) == list(range(203))
    assert order == list(sampler) and order != sampler.order(1)  # deterministic per epoch, new each epoch
    assert order != LengthGroupedSampler(lengths, 4, seed=2, group_batches=10).order(0)

    def padded(indices):
        return sum(4 * max(lengths[i] for i in indices[k : k + 4]) for k in range(0, len(indices), 4))

    random_order = torch.randperm(203, generator=torch.Generator().manual_seed(0)).tolist()
    assert padded(order) < 0.8 * padded(random_order)
    assert len(order[200:]) == 3  # the short batch is last so DataLoader batches line up with groups


def test_grouped_datamodule_pads_less_and_resumes_mid_epoch(tmp_path):
    def make(group: bool) -> InstructDataModule:
        dm = InstructDataModule(source="demo", batch_size=8, seed=5, group_by_length=group, pack=False, cache_dir=str(tmp_path / "cache"))
        dm.setup("fit")
        return dm

    plain, grouped = make(False), make(True)
    batches = list(grouped.train_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == len(grouped.train_dataset)
    pads = [sum(int((b["input_ids"] == dm.tokenizer.pad_id).sum()) for b in dm.train_dataloader()) for dm in (plain, grouped)]
    assert pads[1] < 0.5 * pads[0]

    for epoch in (0, 1):  # Lightning sets the epoch; the position within it comes from the state dict
        loader = grouped.train_dataloader()
        loader.sampler.set_epoch(epoch)
        full = [b["input_ids"] for b in loader]
        loader = grouped.train_dataloader()
        loader.sampler.set_epoch(epoch)
        iterator = iter(loader)
        for _ in range(5):
            next(iterator)
        state = loader.state_dict()
        restored = grouped.train_dataloader()  # a fresh process: epoch 0 until the state says otherwise
        restored.load_state_dict(state)
        rest = [b["input_ids"] for b in restored]
        assert len(rest) == len(full) - 5
        assert all(torch.equal(a, b) for a, b in zip(rest, full[5:]))


# ---- bf16 through the Trainer ------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_train_on_cpu(tmp_path, precision):
    dm = InstructDataModule(source="demo", batch_size=4, max_seq_len=64, group_by_length=True, cache_dir=str(tmp_path / "cache"))
    torch.manual_seed(0)
    module = LoRAFinetune(model_name="tiny_llama2", model_args=TINY, export=False, warmup_steps=0, lr=1e-2, loss_chunk_size=16)
    trainer = lightning.Trainer(
        max_steps=3,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    loss = trainer.callback_metrics["train_loss"]
    assert torch.isfinite(loss)
    # bf16-true: everything bf16. bf16-mixed: frozen linear weights stored in bf16 (autocast computes in it
    # anyway), the trained adapters and the norms in float32.
    dtypes = {name: p.dtype for name, p in module.model.named_parameters()}
    assert dtypes["lm_head.weight"] == dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    trained = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert dtypes["model.layers.0.self_attn.q_proj.lora_A.weight"] == dtypes["model.norm.weight"] == trained


def test_bf16_mixed_frozen_weights_stored_in_bf16_give_the_same_loss_and_gradients():
    """Storing LoRA's frozen linear weights in bf16 under bf16-mixed changes no bit of the loss or the
    adapters' gradients: autocast casts them to bf16 for every matmul anyway."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    modules = []
    for _ in range(2):
        module = LoRAFinetune(model_name="tiny_llama2", model_args=TINY, export=False, lora_dropout=0.0)
        module.configure_model()
        modules.append(module)
    modules[1].model.load_state_dict(modules[0].model.state_dict())
    modules[1]._trainer = SimpleNamespace(precision="bf16-mixed")
    modules[1].store_frozen_linears_in_compute_dtype(modules[1].model)
    assert modules[1].model.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(1, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": torch.where(torch.arange(24) < 8, -100, ids)}
    losses, grads = [], []
    for module in modules:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = module.loss_sum(batch)
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in module.model.named_parameters() if p.requires_grad})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


# ---- sample packing ----------------------------------------------------------------------------


def test_packed_batch_gives_each_sample_its_unpacked_loss_and_gradients():
    from lightning_tune.data import collate, collate_packed

    generator = torch.Generator().manual_seed(2)
    samples = []
    for length, prompt in ((5, 2), (9, 4), (7, 3)):
        ids = torch.randint(1, 512, (length,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    samples.append({"input_ids": samples[0]["input_ids"], "labels": list(samples[0]["input_ids"])})  # train_on_input: BOS labelled
    packed = collate_packed(samples)
    assert packed["input_ids"].shape == (1, 5 + 9 + 7 + 5) and "attn_mask" not in packed  # boundaries: positions restart
    assert packed["positions"][0, 5:14].tolist() == list(range(9))

    module = build(FullFinetune, loss_chunk_size=4)
    per_sample = []
    for sample in samples:  # each sample alone: no padding, no neighbours
        loss, tokens = module.loss_sum(collate([sample], pad_id=0))
        per_sample.append((loss, tokens))
    padded_loss, padded_tokens = module.loss_sum(collate(samples, pad_id=0))
    padded_loss.backward()
    padded_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    packed_loss, packed_tokens = module.loss_sum(packed)
    packed_loss.backward()
    assert packed_tokens == padded_tokens == sum(t for _, t in per_sample)
    torch.testing.assert_close(packed_loss, sum(loss for loss, _ in per_sample))
    torch.testing.assert_close(packed_loss, padded_loss)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, padded_grads[name], msg=name)


def test_packing_datamodule_trains(tmp_path):
    dm = InstructDataModule(source="demo", batch_size=4, max_seq_len=64, pack=True, group_by_length=True, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    first = next(iter(dm.train_dataloader()))
    assert first["input_ids"].shape[0] == 1 and (first["input_ids"] != dm.tokenizer.pad_id).all()
    module = LoRAFinetune(model_name="tiny_llama2", model_args=TINY, export=False, warmup_steps=0)
    trainer = lightning.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train_loss"])


# ---- every default speed option at once, against transformers ----------------------------------


@pytest.mark.parametrize("recipe", [FullFinetune, LoRAFinetune])
def test_default_speed_options_give_transformers_loss(tmp_path, recipe):
    """Packed batch (attention per sample), head only on labelled positions, chunked cross-entropy (tiny
    chunks), frozen-base LoRA: the per-token loss equals transformers' on the right-padded batch, with its
    attention mask and its own cross-entropy (rel 1e-5)."""
    from hf_helpers import tiny_hf_llama

    from lightning_tune.data import collate, collate_packed

    hf = tiny_hf_llama(num_kv_heads=2)
    hf.save_pretrained(tmp_path / "base")
    module = recipe(checkpoint_dir=str(tmp_path / "base"), loss_chunk_size=5, export=False)
    module.configure_model()
    generator = torch.Generator().manual_seed(3)
    samples = []
    for length, prompt in ((11, 4), (23, 9), (6, 2), (17, 5)):
        ids = [1] + torch.randint(3, 96, (length - 1,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    loss_sum, tokens = module.loss_sum(collate_packed(samples))

    padded = collate(samples, pad_id=0)
    attention = torch.tensor([[1] * len(s["input_ids"]) + [0] * (padded["input_ids"].shape[1] - len(s["input_ids"])) for s in samples])
    with torch.no_grad():
        logits = hf(input_ids=padded["input_ids"], attention_mask=attention).logits
    targets = padded["labels"][:, 1:]
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
    assert int(tokens) == int((targets != -100).sum())
    torch.testing.assert_close(loss_sum.detach() / tokens, expected / tokens, rtol=1e-5, atol=0)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_loss_reads_its_targets_by_the_host_index_as_by_the_label_mask(packed):
    """loss_sum gathers the labelled positions by the collate's label_index (no count the device
    must report to the host): the very same loss bits and gradients as the boolean label mask."""
    from lightning_tune.data import collate, collate_packed

    generator = torch.Generator().manual_seed(3)
    samples = []
    for length, prompt in ((6, 2), (11, 5), (8, 8)):  # the last sample trains nothing
        ids = torch.randint(1, 512, (length,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batch = collate_packed(samples) if packed else collate(samples, pad_id=0)
    module = build(LoRAFinetune, loss_chunk_size=4, lora_dropout=0.0)  # no dropout: two forwards, the same numbers
    loss, tokens = module.loss_sum(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    # The boolean-mask formulation, written out.
    hidden = module.model.hidden_states(batch["input_ids"], batch.get("positions"), seq_lens=batch.get("seq_lens"))[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    expected = linear_cross_entropy_sum(hidden[keep], module.model.lm_head.weight, targets[keep], 4)
    expected.backward()
    assert int(tokens) == int(keep.sum()) == 4 + 6
    assert torch.equal(loss, expected)
    for name, p in module.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name]), name
    without = {k: v for k, v in batch.items() if k != "label_index"}  # a batch built by hand
    assert torch.equal(module.loss_sum(without)[0], loss)


SYNCING_OPS = {"aten.nonzero.default", "aten._local_scalar_dense.default", "aten.masked_select.default", "aten.repeat_interleave.Tensor", "aten.unique_consecutive.default", "aten._unique2.default"}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_training_step_runs_no_op_that_makes_a_gpu_wait(packed):
    """The CPU proxy of a GPU's sync check: in a loss + backward from a collated batch, no op whose
    output size or value the host must read back (nonzero, .item(), masked_select, boolean-mask
    indexing, ...) is dispatched, so on a GPU the step queues without waiting for the device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_tune.data import collate, collate_packed

    generator = torch.Generator().manual_seed(4)
    samples = []
    for length, prompt in ((7, 3), (12, 4), (5, 1)):
        ids = torch.randint(1, 512, (length,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batch = collate_packed(samples) if packed else collate(samples, pad_id=0)
    module = build(LoRAFinetune, loss_chunk_size=4)
    seen: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            boolean_index = name.startswith("aten.index") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])
            )
            if name in SYNCING_OPS or boolean_index:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    with Watch():
        loss, tokens = module.loss_sum(batch)
        (loss / tokens).backward()
    assert seen == []
    without = {k: v for k, v in batch.items() if k != "label_index"}  # the watch does catch the fallback
    with Watch():
        module.loss_sum(without)
    assert "aten.nonzero.default" in seen
