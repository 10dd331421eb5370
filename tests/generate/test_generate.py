"""Generation against Hugging Face `generate` (token for token), sampling rules, validation, streaming."""

from __future__ import annotations

import pytest
import torch

from lightning_tune.generate import GenerationStats, TextStreamer, filter_logits, generate, generate_text, sample_next
from lightning_tune.model import Llama, llama2

transformers = pytest.importorskip("transformers")

VOCAB = 256
NEW = 20
PROMPTS = [[1, 17, 93, 200, 45, 8, 130], [1, 77], [1, 3, 250, 61]]  # lengths 7, 2, 4: real left padding


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def models(request) -> tuple[Llama, transformers.LlamaForCausalLM]:
    """A random tiny HF Llama (GQA 4/2 heads) and ours with the very same weights."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        attn_implementation=request.param,  # Llama 2 eps, HF default is 1e-6
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    ours = llama2(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=176, max_seq_len=128)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours.eval(), hf


def hf_generate(hf, prompts: list[list[int]], eos_id: int | None = None, pad_id: int = 0, **kwargs) -> list[list[int]]:
    """HF generate on left-padded prompts; new tokens per row, cut after EOS (HF pads finished rows)."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    hf.generation_config.bos_token_id = None
    hf.generation_config.eos_token_id = eos_id  # the random config's default EOS (2) must not stop HF
    hf.generation_config.pad_token_id = pad_id
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_length=0, **kwargs)
    rows = out[:, T:].tolist()
    return [r[: r.index(eos_id) + 1] if eos_id in r else r for r in rows]


def first_new_token(row: list[int], after: int) -> tuple[int, int]:
    """A token whose first occurrence in `row` is at index >= `after`: an EOS that stops mid-way."""
    for i in range(after, len(row)):
        if row[i] not in row[:i]:
            return row[i], i
    raise AssertionError(f"no fresh token after {after} in {row}: pick other prompts")


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "batch3"])
def test_greedy_matches_transformers(models, prompts):
    ours, hf = models
    expected = hf_generate(hf, prompts, do_sample=False)
    assert all(len(r) == NEW for r in expected)
    assert all(len(set(r)) > 3 for r in expected), "degenerate reference: pick other prompts"
    assert generate(ours, prompts, NEW) == expected


def test_batch_equals_one_by_one(models):
    """Left padding changes nothing: each row of the batch equals that prompt generated alone."""
    ours, _ = models
    batch = generate(ours, PROMPTS, NEW)
    assert batch == [generate(ours, [p], NEW)[0] for p in PROMPTS]


def test_eos_stops_one_prompt(models):
    ours, hf = models
    greedy = generate(ours, PROMPTS[:1], NEW)[0]
    eos, at = first_new_token(greedy, after=5)
    steps = []
    out = generate(ours, PROMPTS[:1], NEW, eos_id=eos, on_tokens=steps.append)
    assert out == [greedy[: at + 1]]  # cut after the EOS, which is included
    assert len(steps) == at + 1  # and decoding stopped there
    assert out == hf_generate(hf, PROMPTS[:1], eos_id=eos, do_sample=False)


def test_eos_stops_rows_independently(models):
    ours, hf = models
    greedy = generate(ours, PROMPTS, NEW)
    eos, at = first_new_token(greedy[0], after=3)
    out = generate(ours, PROMPTS, NEW, eos_id=eos)
    for row, full in zip(out, greedy):
        cut = full[: full.index(eos) + 1] if eos in full else full
        assert row == cut
    assert len(out[0]) == at + 1 and any(len(r) != len(out[0]) for r in out)
    assert out == hf_generate(hf, PROMPTS, eos_id=eos, do_sample=False)


def test_on_tokens_streams_every_step_with_pad_for_ended_rows(models):
    ours, _ = models
    greedy = generate(ours, PROMPTS, NEW)
    eos, at = first_new_token(greedy[1], after=2)
    steps: list[torch.Tensor] = []
    out = generate(ours, PROMPTS, NEW, eos_id=eos, pad_id=255, on_tokens=lambda t: steps.append(t.clone()))
    cols = torch.stack(steps, dim=1)  # [B, steps]
    assert cols[1, : at + 1].tolist() == out[1] and (cols[1, at + 1 :] == 255).all()
    assert [cols[b, : len(r)].tolist() for b, r in enumerate(out)] == out


def test_sampling_matches_transformers_with_the_same_seed(models):
    """Same warpers, same softmax, same torch.multinomial stream: HF's draws, token for token."""
    ours, hf = models
    kwargs = dict(temperature=0.8, top_k=40, top_p=0.9)
    torch.manual_seed(123)
    expected = hf_generate(hf, PROMPTS, do_sample=True, **kwargs)
    assert generate(ours, PROMPTS, NEW, seed=123, **kwargs) == expected


def test_sampling_seeded_reproducible_and_seed_dependent(models):
    ours, _ = models
    a = generate(ours, PROMPTS, NEW, temperature=1.0, seed=1)
    assert a == generate(ours, PROMPTS, NEW, temperature=1.0, seed=1)
    assert a != generate(ours, PROMPTS, NEW, temperature=1.0, seed=2)
    assert a != generate(ours, PROMPTS, NEW)  # and it is not greedy


def test_top_k_1_is_greedy_at_any_temperature(models):
    ours, _ = models
    greedy = generate(ours, PROMPTS, NEW)
    for temperature in (0.5, 1.0, 5.0):
        assert generate(ours, PROMPTS, NEW, temperature=temperature, top_k=1, seed=0) == greedy


# sample_next / filter_logits on hand-made logits


def test_top_p_keeps_the_smallest_set_reaching_top_p():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()  # most likely first: 1 (.5), 3 (.3), 2 (.15), 0 (.05)
    for top_p, kept in [(0.3, {1}), (0.7, {1, 3}), (0.9, {1, 3, 2}), (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]:
        finite = set(torch.isfinite(filter_logits(logits, top_p=top_p))[0].nonzero().flatten().tolist())
        assert finite == kept, top_p
        g = torch.Generator().manual_seed(0)
        draws = set(sample_next(logits.expand(4000, -1), temperature=1.0, top_p=top_p, generator=g).tolist())
        assert draws == kept, top_p


def test_top_k_keeps_k_most_likely():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).nonzero()[:, 1].tolist() == [1, 2]
    assert torch.isfinite(filter_logits(logits, top_k=99)).all()  # k beyond the vocab keeps all


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, None), (0.7, None, 0.8), (1.3, 20, 0.5), (0.5, 3, 0.95)])
def test_filter_logits_equals_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 100) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    torch.testing.assert_close(filter_logits(logits, temperature, top_k, top_p), expected, rtol=0, atol=0)


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    assert torch.equal(sample_next(logits), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=0.0, top_k=5, top_p=0.5), logits.argmax(-1))


def test_cache_allocated_once_and_prefill_head_on_last_position_only(models, monkeypatch):
    ours, _ = models
    setups, head_inputs = [], []
    import lightning_tune.generate.loop as generation

    setup = generation.new_kv_caches  # what generate builds the caches with (int8 heads have no fp weight)
    monkeypatch.setattr(generation, "new_kv_caches", lambda model, *a: (setups.append(a), setup(model, *a))[1])
    hook = ours.lm_head.register_forward_hook(lambda mod, args, out: head_inputs.append(tuple(args[0].shape)))
    try:
        generate(ours, PROMPTS, 5)
    finally:
        hook.remove()
    assert setups == [(3, 7 + 5)]  # batch 3, longest prompt + new tokens, once
    assert head_inputs == [(3, 64)] + [(3, 1, 64)] * 4  # prefill: last position only; then one per step


# Validation and model state


@pytest.mark.parametrize(
    "prompts,kwargs,message",
    [
        ([], {}, "prompts is empty"),
        ([[1, 2], []], {}, "prompt 1 has no tokens"),
        ([[1, VOCAB]], {}, r"prompt 0 has token ids outside \[0, 256\)"),
        ([[1]], {"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ([[1]], {"temperature": -0.1}, "temperature must be >= 0"),
        ([[1]], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ([[1]], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ([[1]], {"top_k": 0}, "top_k must be >= 1"),
        ([[1] * 100], {"max_new_tokens": 29}, r"longest prompt \(100 tokens\) \+ max_new_tokens \(29\) exceeds the model's max_seq_len \(128\)"),
    ],
)
def test_bad_input_is_one_clear_error(models, prompts, kwargs, message):
    ours, _ = models
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message) as info:
        generate(ours, prompts, **kwargs)
    assert "\n" not in str(info.value)
    assert all(layer.self_attn.kv_cache is None for layer in ours.model.layers)


def test_prompt_filling_max_seq_len_exactly_works(models):
    ours, _ = models
    assert len(generate(ours, [[1] * 100], 28)[0]) == 28


def test_no_kv_cache_after_generate_or_error(models):
    ours, _ = models
    generate(ours, PROMPTS, 3)
    assert all(layer.self_attn.kv_cache is None for layer in ours.model.layers)

    def boom(tokens: torch.Tensor) -> None:
        raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        generate(ours, PROMPTS, 3, on_tokens=boom)
    assert all(layer.self_attn.kv_cache is None for layer in ours.model.layers)
    assert torch.isfinite(ours(torch.tensor([PROMPTS[0]]))).all()  # plain forward works again


# Streaming text


class ByteTokenizer:
    """SentencePiece-like stub: ids 3.. are UTF-8 bytes, "▁" (id of b" ") marks a word start and a
    leading space is dropped on decode, as SentencePiece does; bytes of an unfinished character
    decode to U+FFFD."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = [b + 3 for b in (" " + text).encode()]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: list[int]) -> str:
        text = bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


def test_text_streamer_prints_only_new_text_and_holds_partial_characters():
    tok = ByteTokenizer()
    prompt = tok.encode("Hi")
    new = tok.encode(" café au lait", add_bos=False)[1:] + [tok.eos_id]  # "é" is two byte tokens
    printed: list[str] = []
    streamer = TextStreamer(tok, prompt, print_fn=printed.append)
    for t in new:
        streamer(torch.tensor([t]))
    assert "".join(printed) == " café au lait"  # the space after the prompt survives
    assert all("\ufffd" not in p for p in printed)
    assert streamer.text == " café au lait"
    stats = streamer.stats()
    assert isinstance(stats, GenerationStats) and stats.new_tokens == len(new)
    assert stats.prefill_s >= 0 and stats.decode_s >= 0


def test_text_streamer_with_llama2_sentencepiece(llama2_tokenizer_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path))
    text = "Grüße, 世界! Tokens stream 🙂 one by one."
    ids = sp.encode(text)
    printed: list[str] = []
    streamer = TextStreamer(sp_adapter(sp), [sp.bos_id()] + ids[:2], print_fn=printed.append)
    for t in ids[2:]:
        streamer(torch.tensor([t]))
    assert sp.decode(ids[:2]) + "".join(printed) == text


def sp_adapter(sp):
    class Adapter:
        bos_id, eos_id, pad_id = sp.bos_id(), sp.eos_id(), sp.pad_id()
        decode = staticmethod(sp.decode)

    return Adapter()


class LetterTokenizer:
    """Every id >= 3 is one letter; enough to check what generate_text prints and returns."""

    bos_id, eos_id, pad_id = 1, 2, -1  # pad -1 like Llama 2's SentencePiece model

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        return [self.bos_id] * add_bos + [ord(c) - ord("a") + 3 for c in text.lower()] + [self.eos_id] * add_eos

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + (i - 3) % 26) for i in ids if i >= 3)


def test_generate_text_returns_text_and_stats(models, capsys):
    ours, _ = models
    tok = LetterTokenizer()
    text, stats = generate_text(ours, tok, "Hi", 12, stream=True)
    assert capsys.readouterr().out == text + "\n"
    assert stats.new_tokens <= 12 and stats.decode_tokens_per_s > 0
    ids = generate(ours, [tok.encode("Hi")], 12, eos_id=tok.eos_id)[0]
    assert text == tok.decode([i for i in ids if i != tok.eos_id])


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_greedy_with_a_peft_adapter_matches_peft(models, tmp_path, use_dora):
    """generate/chat's `load_model(..., adapter_dir)`: a PEFT adapter (LoRA or DoRA) over a HF
    directory decodes the tokens PEFT's own model generates."""
    pytest.importorskip("peft")
    from hf_helpers import trained_peft_model

    from lightning_tune.cli.loading import load_model
    from lightning_tune.layers.lora import lora_modules

    _, hf = models
    hf.save_pretrained(tmp_path / "base")
    peft_model = trained_peft_model(hf, seed=4, b_std=0.2, magnitude_spread=0.3, r=4, lora_alpha=8, use_dora=use_dora, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    expected = hf_generate(peft_model, PROMPTS, do_sample=False)
    assert expected != hf_generate(hf, PROMPTS, do_sample=False)  # the adapter changes the text
    ours = load_model(str(tmp_path / "base"), str(tmp_path / "adapter"), "cpu", None)
    assert len(lora_modules(ours)) == 8 and all(m.use_dora == use_dora for m in lora_modules(ours).values())
    assert generate(ours, PROMPTS, NEW) == expected
