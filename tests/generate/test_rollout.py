"""GRPO's rollouts (issue 31): G completions per prompt through our decoder; greedy equals transformers'
greedy `generate` token for token, a seed reproduces a sampled batch, end tokens and truncation."""

from __future__ import annotations

import pytest
import torch

from lightning_tune.generate.rollout import rollout
from lightning_tune.model import llama2

transformers = pytest.importorskip("transformers")

VOCAB, NEW = 128, 8
PROMPTS = [[1, 17, 93, 100, 45], [1, 77]]  # different lengths: left padding inside the batch


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=64, rms_norm_eps=1e-5, attn_implementation="eager",
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(config).eval()
    ours = llama2(vocab_size=VOCAB, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64, max_seq_len=64)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


def hf_greedy(hf, prompt: list[int], eos_id: int | None) -> list[int]:
    hf.generation_config.bos_token_id = None
    hf.generation_config.eos_token_id = eos_id
    hf.generation_config.pad_token_id = 0
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=NEW, min_length=0, do_sample=False)
    row = out[0, len(prompt) :].tolist()
    return row[: row.index(eos_id) + 1] if eos_id in row else row


def test_greedy_rollouts_equal_transformers_generate(models) -> None:
    """temperature 0: every completion of a prompt is transformers' greedy continuation; with an end token
    that appears mid-way the completion stops after it (kept) and is not truncated."""
    ours, hf = models
    free = rollout(ours.train(), PROMPTS, 3, NEW, temperature=0.0)
    assert ours.training  # the mode is put back
    assert free.prompt_ids == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    for i, prompt in enumerate(PROMPTS):
        want = hf_greedy(hf, prompt, None)
        assert free.completion_ids[3 * i : 3 * i + 3] == [want] * 3
    assert all(free.truncated)  # no end token: every completion ran out of tokens
    eos = free.completion_ids[0][3]  # a token of prompt 0's continuation: it must stop there
    stopped = rollout(ours, PROMPTS, 2, NEW, temperature=0.0, eos_id=eos)
    for i, prompt in enumerate(PROMPTS):
        want = hf_greedy(hf, prompt, eos)
        assert stopped.completion_ids[2 * i : 2 * i + 2] == [want] * 2
        assert stopped.truncated[2 * i] == (eos not in want)
    assert stopped.completion_ids[0][-1] == eos and len(stopped.completion_ids[0]) <= 4 and not stopped.truncated[0]


def test_sampled_rollouts_are_reproducible_by_seed(models) -> None:
    """The same seed samples the same completions (a resumed run re-samples its step), another seed others;
    a group's completions differ from each other at temperature 1."""
    ours, _ = models
    a = rollout(ours, PROMPTS, 4, NEW, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    b = rollout(ours, PROMPTS, 4, NEW, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    c = rollout(ours, PROMPTS, 4, NEW, temperature=1.0, top_k=50, top_p=0.95, seed=8)
    assert a.completion_ids == b.completion_ids and a.completion_ids != c.completion_ids
    assert len({tuple(x) for x in a.completion_ids[:4]}) > 1


@pytest.mark.parametrize("compile", [False, True])
def test_each_prompt_is_prefilled_once_and_samples_as_its_rows_repeated(models, compile: bool) -> None:
    """generate(..., num_samples=G) prefills each prompt once and copies its keys and values to its G rows:
    with the same seed it samples what the G-times repeated prompts sample, token for token (eager, and the
    static-shape decode step, compiled here with the eager backend), and every row keeps its own end."""
    from lightning_tune.generate.loop import generate

    ours, _ = models
    G = 4
    repeated = [list(p) for p in PROMPTS for _ in range(G)]
    kwargs = dict(temperature=1.0, top_k=50, seed=11, eos_id=5, compile=compile, compile_backend="eager")
    shared = generate(ours.eval(), PROMPTS, NEW, num_samples=G, **kwargs)
    assert shared == generate(ours, repeated, NEW, **kwargs)
    assert len(shared) == len(repeated) and len({tuple(r) for r in shared}) > 2  # sampled: the rows differ
    greedy = generate(ours, PROMPTS, NEW, num_samples=G, temperature=0.0)
    assert greedy == [row for row in generate(ours, PROMPTS, NEW, temperature=0.0) for _ in range(G)]
