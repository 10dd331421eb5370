"""The chat verb: replies reuse the KV cache across turns yet equal generation on the whole rendered
conversation; the verb reads messages from stdin, /reset and /exit work, errors are one line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_tune.checkpoint import save_hf_checkpoint
from lightning_tune.cli.chat import chat_command
from lightning_tune.cli.errors import UsageError
from lightning_tune.generate import generate
from lightning_tune.generate.chat import ChatSession
from lightning_tune.model import tiny_llama2
from lightning_tune.tokenizer import load_tokenizer
from lightning_tune.tokenizer.chat_template import LLAMA2, render

DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "lightning_tune" / "data" / "assets" / "demo_tokenizer.model"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_llama2(512).eval()


def test_cached_turns_equal_generation_on_the_whole_conversation(model) -> None:
    tokenizer = load_tokenizer(DEMO_TOKENIZER)
    session = ChatSession(model, tokenizer, LLAMA2, system="Answer in a few words.", max_new_tokens=6, max_context=128)
    turns = []
    try:
        for user in ["Remember the word frog.", "Which word did I give you?"]:
            session.respond(user)
            turns.append((list(session.messages[:-1]), session.reused, session.reply_ids))
        assert [message["role"] for message in session.messages] == ["system", "user", "assistant", "user", "assistant"]
        session.reset()
        assert session.messages == [{"role": "system", "content": "Answer in a few words."}] and session.cached == []
    finally:
        session.close()
    for index, (history, reused, reply) in enumerate(turns):
        text = render(LLAMA2, history, special_tokens=tokenizer.special_tokens, add_generation_prompt=True).text
        prompt = tokenizer.encode_with_offsets(text, chat=True)[0]
        # Llama 2's template is prefix-stable: turn 2 computes only what follows the cached first turn
        assert reused == 0 if index == 0 else reused > len(prompt) // 2
        expected = generate(model, [prompt], 6, eos_id=tokenizer.eos_id)[0]  # fresh cache, the whole prompt
        assert reply == [t for t in expected if t != tokenizer.eos_id]


def test_the_cache_grows_with_the_conversation_not_to_the_models_context() -> None:
    """A model whose config says 2^20 positions: the cache holds 1024 slots for a short chat (#29: chat sized
    it from the file's context length, up to terabytes), grows when a turn needs more, keeps the cached turns
    (the reply still equals generation on the whole conversation with a fresh cache)."""
    from lightning_tune.model import CausalLM, model_config

    torch.manual_seed(0)
    big = CausalLM(model_config("tiny_llama2", vocab_size=512, max_seq_len=2**20)).eval()
    tokenizer = load_tokenizer(DEMO_TOKENIZER)
    session = ChatSession(big, tokenizer, LLAMA2, max_new_tokens=4)
    caches = lambda: {layer.self_attn.kv_cache.k.shape[2] for layer in big.model.layers}  # noqa: E731
    try:
        session.respond("Remember the word frog.")
        assert session.capacity == 1024 and caches() == {1024}
        long = " ".join(["frog"] * 700)
        session.respond(long)
        history = list(session.messages[:-1])
        assert session.capacity == 2048 and caches() == {2048} and session.reused > 0
        reply = session.reply_ids
    finally:
        session.close()
    text = render(LLAMA2, history, special_tokens=tokenizer.special_tokens, add_generation_prompt=True).text
    prompt = tokenizer.encode_with_offsets(text, chat=True)[0]
    assert 1024 < len(prompt) + 4 <= 2048
    expected = generate(big, [prompt], 4, eos_id=tokenizer.eos_id)[0]
    assert reply == [t for t in expected if t != tokenizer.eos_id]


def test_chat_verb_through_stdin(model, tmp_path: Path) -> None:
    checkpoint = save_hf_checkpoint(model, model.config, tmp_path / "ckpt", tokenizer_path=DEMO_TOKENIZER)
    command = [sys.executable, "-m", "lightning_tune", "chat", "--checkpoint_dir", str(checkpoint), "--chat_template", "llama2", "--max_new_tokens", "4", "--device", "cpu"]
    done = subprocess.run(command, input="Add 2 and 5.\n/reset\nhello\n/exit\nnever read\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and lines[1] == "(conversation reset)"
    with pytest.raises(UsageError, match=r"^--chat_template: the tokenizer has no chat template; set it to a built-in"):
        chat_command(str(checkpoint), device="cpu")  # the demo tokenizer has none: refused before the model loads


def test_generate_template_chat_uses_the_tokenizers_template_and_system(model, tmp_path: Path, capsys) -> None:
    from lightning_tune.cli.generate import generate_command

    checkpoint = save_hf_checkpoint(model, model.config, tmp_path / "ckpt", tokenizer_path=DEMO_TOKENIZER)
    (checkpoint / "chat_template.jinja").write_text(LLAMA2)  # read beside tokenizer.model, as transformers does
    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer.chat_template == LLAMA2
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 5."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == tokenizer.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nAdd 2 and 5. [/INST]")
    expected = tokenizer.decode([t for t in generate(model, [prompt], 5, eos_id=tokenizer.eos_id)[0] if t != tokenizer.eos_id])
    capsys.readouterr()
    generate_command(str(checkpoint), prompt=["Add 2 and 5."], template="chat", system="Be brief.", max_new_tokens=5, device="cpu")
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(UsageError, match="--system: only with --template chat"):
        generate_command(str(checkpoint), prompt=["x"], system="Be brief.", device="cpu")
