"""model.py against transformers' LlamaForCausalLM: same keys, same logits, cache = no cache, exact sizes."""

import pytest
import torch
import torch.nn.functional as F

import lightning_tune.model.attention as model_module
from lightning_tune.model import Llama, LlamaConfig, PackedRows, RMSNorm, apply_rope, llama2_7b, llama2_13b, llama2_70b, rope_cos_sin, sample_offsets, segment_attention

transformers = pytest.importorskip("transformers")
from hf_helpers import tiny_hf_llama  # noqa: E402
from transformers.models.llama import modeling_llama as hf_llama  # noqa: E402


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def hf_model(num_kv_heads: int, seed: int = 0) -> "transformers.LlamaForCausalLM":
    return tiny_hf_llama(num_kv_heads, intermediate_size=160, seed=seed)


def ours_from(hf: "transformers.LlamaForCausalLM") -> Llama:
    c = hf.config
    model = Llama(LlamaConfig(c.vocab_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size, c.max_position_embeddings, c.rms_norm_eps, 10000.0))
    model.load_state_dict(hf.state_dict(), strict=True)  # strict: exactly HF's keys and shapes
    return model.eval()


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_logits_match_transformers(num_kv_heads: int) -> None:
    hf = hf_model(num_kv_heads)
    ours = ours_from(hf)
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())  # same keys (order differs: HF declares attention first)
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape == (2, 24, 96)
    assert rel_error(got, expected) <= 1e-5


@pytest.mark.parametrize("seq_lens", [None, [[5, 11]]], ids=["padded", "packed"])
def test_activation_checkpointing_recomputes_the_same_loss_and_gradients(seq_lens) -> None:
    """Each layer's inputs (rotary tables, mask, packed rows) reach it by keyword, through
    torch.utils.checkpoint too: the recomputed forward is the same arithmetic, so bit-equal."""
    model = ours_from(hf_model(2)).train()
    tokens = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.model.activation_checkpointing = checkpointing
        loss = F.cross_entropy(model(tokens, seq_lens=seq_lens)[0, :-1], tokens[0, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss_plain, loss_ckpt)
    assert all(torch.equal(grads_plain[n], grads_ckpt[n]) for n in grads_plain)


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_kv_cache_decoding_equals_full_forward(num_kv_heads: int) -> None:
    ours = ours_from(hf_model(num_kv_heads))
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(tokens)
        ours.setup_kv_cache(batch_size=2, max_seq_len=32)
        steps = [ours(tokens[:, :6], cache_pos=torch.arange(6))]  # prefill
        for t in range(6, 16):  # then one token at a time
            steps.append(ours(tokens[:, t : t + 1], cache_pos=torch.tensor([t])))
        ours.reset_kv_cache()
    assert rel_error(torch.cat(steps, dim=1), full) <= 1e-5


def block_diagonal_causal_mask(lengths: list[int]) -> torch.Tensor:
    """[S, S] bool: token i sees token j iff both are in the same sample and j <= i."""
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    index = torch.arange(len(sample))
    return (sample[:, None] == sample[None, :]) & (index[None, :] <= index[:, None])


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_packed_row_equals_each_sample_alone_and_the_block_diagonal_mask(num_kv_heads: int) -> None:
    ours = ours_from(hf_model(num_kv_heads))
    lengths = [5, 1, 9, 7]
    tokens = torch.randint(0, 96, (1, sum(lengths)), generator=torch.Generator().manual_seed(4))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = ours(tokens, positions, seq_lens=[lengths])
        derived = ours(tokens, seq_lens=[lengths])  # positions default to 0..n-1 per sample
        alone = torch.cat([ours(t) for t in tokens.split(lengths, dim=1)], dim=1)
        masked = ours(tokens, positions, block_diagonal_causal_mask(lengths)[None, None])
    assert rel_error(packed, alone) <= 1e-6
    assert rel_error(packed, masked) <= 1e-6
    assert torch.equal(packed, derived)


def test_packed_rows_may_differ_and_restarting_positions_alone_stay_causal() -> None:
    ours = ours_from(hf_model(2))
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7], list(range(12))])  # row 1 is one sample
    with torch.no_grad():
        got = ours(tokens, positions, seq_lens=[[4, 8], [12]])
        row0 = torch.cat([ours(tokens[:1, :4]), ours(tokens[:1, 4:])], dim=1)
        row1 = ours(tokens[1:])
        shared = ours(tokens, positions[0], seq_lens=[[4, 8]])  # one list: the same samples in every row
        expected_shared = torch.cat([ours(tokens[:, :4]), ours(tokens[:, 4:])], dim=1)
        # Not told: positions that restart at 0 are just positions; attention stays causal over the row.
        untold = ours(tokens[:1], positions[:1])
        causal = ours(tokens[:1], positions[:1], torch.ones(12, 12, dtype=torch.bool).tril()[None, None])
    assert rel_error(got[:1], row0) <= 1e-6 and rel_error(got[1:], row1) <= 1e-6
    assert rel_error(shared, expected_shared) <= 1e-6
    assert rel_error(untold, causal) <= 1e-6 and rel_error(untold, row0) > 1e-3


def reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False, **unused):
    """torch.nn.attention.varlen.varlen_attn as its docstring defines it, on any device: tokens [N, heads, D]
    flattened over every sequence, sequence i spanning cu_seq[i]:cu_seq[i + 1]; window (-1, 0) is causal."""
    assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    assert cu_seq_q.dtype == torch.int32 and int(cu_seq_q[-1]) == q.shape[0]
    out = torch.empty_like(q)
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        qi, ki, vi = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, n, D]
        out[start:end] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=enable_gqa)[0].transpose(0, 1)
    return out


def test_sample_offsets_flatten_every_rows_samples():
    assert sample_offsets([[4, 8], [12]], 2) == [0, 4, 12, 24]
    assert sample_offsets([[3, 2]], 3) == [0, 3, 5, 8, 10, 13, 15]  # one list: the same samples in every row


@pytest.mark.parametrize("seq_lens", [[[4, 8], [12]], [[5, 7]]], ids=["per-row", "shared"])
def test_varlen_route_lays_out_tokens_as_the_kernel_reads_them(monkeypatch, seq_lens) -> None:
    """The CUDA path (one varlen call for every sample) against the per-sample loop, in bf16 as on a GPU.

    varlen_attn itself is CUDA-only; the reference above implements its documented contract, so this
    checks our flattening, offsets and the [B, H, T, D] view handed back: the result equals bf16 SDPA
    run on each sample of each row alone, bit for bit (the same kernel on the same numbers).
    """
    monkeypatch.setattr(model_module, "varlen_attention", lambda: reference_varlen_attn)
    B, H, K, T, D = 2, 4, 2, 12, 8
    q, k, v = (torch.randn(B, heads, T, D, generator=torch.Generator().manual_seed(i)).bfloat16() for i, heads in enumerate((H, K, K)))
    rows = seq_lens * B if len(seq_lens) == 1 else seq_lens
    expected = torch.cat(
        [torch.cat([F.scaled_dot_product_attention(*ts, is_causal=True, enable_gqa=True) for ts in zip(*(t[b : b + 1].split(row, dim=2) for t in (q, k, v)))], dim=2) for b, row in enumerate(rows)]
    )
    varlen = PackedRows(seq_lens, torch.tensor(sample_offsets(seq_lens, B), dtype=torch.int32))
    assert varlen.max_len == max(max(row) for row in seq_lens)
    got = segment_attention(q, k, v, varlen, enable_gqa=True)
    assert got.shape == (B, H, T, D) and torch.equal(got, expected)
    assert got.transpose(1, 2).is_contiguous()  # the caller's transpose(1, 2).reshape costs no copy


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-true", "bf16-mixed"])
@pytest.mark.parametrize("lengths", [[8, 12], [700]], ids=["short: fp32", "long: bf16"])
def test_half_precision_cpu_attention_of_short_samples_runs_in_fp32(lengths, autocast: bool) -> None:
    """bf16 SDPA on a CPU is slower than fp32 below ~400 tokens, so short samples are attended in fp32:
    the result is fp32 attention of the same (exactly upcast) inputs, rounded once to bf16. Under
    bf16 autocast too, which would otherwise cast SDPA's fp32 inputs back to bf16."""
    q, k, v = (torch.randn(1, 4, sum(lengths), 16, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(3))
    if autocast:  # as under bf16-mixed: q and k leave the rotary embedding in fp32, v its linear layer in bf16
        q, k = q.float(), k.float()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = segment_attention(q, k, v, PackedRows([lengths]), enable_gqa=False)
    assert got.dtype == q.dtype  # the caller's dtype (under autocast the o_proj casts it again)
    dtype = torch.float32 if max(lengths) <= model_module.CPU_FP32_ATTENTION_MAX_LEN else torch.bfloat16
    parts = [F.scaled_dot_product_attention(*(t.to(dtype) for t in ts), is_causal=True) for ts in zip(*(t.split(lengths, dim=2) for t in (q, k, v)))]
    assert torch.equal(got, torch.cat(parts, dim=2).to(got.dtype))


@pytest.mark.parametrize("seq_lens", [[[4, 4]], [[6, 6], [11]], [[0, 12], [12]], [[12]] * 3])
def test_packed_lengths_that_do_not_cover_the_row_are_refused(seq_lens) -> None:
    ours = ours_from(hf_model(2))
    with pytest.raises(ValueError, match="seq_lens"):
        ours(torch.zeros(2, 12, dtype=torch.long), seq_lens=seq_lens)


@pytest.mark.parametrize(
    ("builder", "expected"),
    [(llama2_7b, 6_738_415_616), (llama2_13b, 13_015_864_320), (llama2_70b, 68_976_648_192)],
    ids=["7b", "13b", "70b"],
)
def test_builders_on_meta_allocate_nothing_and_have_published_sizes(builder, expected: int) -> None:
    with torch.device("meta"):
        model = builder()
    assert all(t.is_meta for t in model.state_dict(keep_vars=True).values())
    assert list(model.buffers()) == []
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"embed_dim": 100, "num_heads": 3}, "divisible by num_heads"),
        ({"num_heads": 4, "num_kv_heads": 3, "embed_dim": 64}, "divisible by num_kv_heads"),
        ({"embed_dim": 12, "num_heads": 4, "num_kv_heads": 4}, "must be even"),
        ({"num_layers": 10**9}, "num_layers must be at most 1,024, got 1,000,000,000"),
        ({"vocab_size": 2**40}, "vocab_size must be at most 4,194,304"),
        ({"head_dim": 2**20}, "head_dim must be at most 2,048"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**kwargs)


def test_rmsnorm_matches_transformers() -> None:
    torch.manual_seed(3)
    ours, theirs = RMSNorm(32, eps=1e-5), hf_llama.LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(32))
        theirs.weight.copy_(ours.weight)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    x16 = x.to(torch.bfloat16)
    torch.testing.assert_close(ours.to(torch.bfloat16)(x16), theirs.to(torch.bfloat16)(x16), rtol=0, atol=0)


def test_rope_matches_transformers() -> None:
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0)
    positions = torch.tensor([[0, 1, 2, 7, 30], [3, 4, 5, 6, 100]])
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 4, 5, 16)
    cos_hf, sin_hf = hf_llama.LlamaRotaryEmbedding(config)(q, positions)
    cos, sin = rope_cos_sin(positions, 16, 500.0, torch.float32)
    torch.testing.assert_close(cos, cos_hf)
    torch.testing.assert_close(sin, sin_hf)
    q_hf, k_hf = hf_llama.apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    torch.testing.assert_close(apply_rope(q, cos, sin), q_hf)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_hf)
