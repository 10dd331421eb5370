"""Chat templates and chat samples: text and ids equal transformers' apply_chat_template, masks come from
one rendering and equal transformers' assistant masks, built-ins match their reference strings."""

import json
import os
import re
from pathlib import Path

import pytest
from conftest import asset

from lightning_tune.data.collate import IGNORE_INDEX
from lightning_tune.data.conversation import DEFAULT_ROLE_MAP, OPENAI_COLUMNS, SHAREGPT_COLUMNS, encode_conversation, normalize_messages
from lightning_tune.data.errors import DataError
from lightning_tune.data.instruct import encode_sample
from lightning_tune.data.templates import ALPACA as ALPACA_PROMPT
from lightning_tune.tokenizer import load_tokenizer
from lightning_tune.tokenizer.chat_template import ALPACA, CHATML, LLAMA2, ChatTemplateError, render, resolve_template

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there 😀, <|eot_id|> is text here"},
        {"role": "assistant", "content": "Hello! user"},
        {"role": "user", "content": "  code?\n"},
        {"role": "assistant", "content": "def f():\n    return 1  "},
    ],
    [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "user"}, {"role": "user", "content": "日本語で"}, {"role": "assistant", "content": " はい。"}],
    # Qwen 3 drops earlier turns' reasoning: rendering is not prefix-stable
    [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\nR2\n</think>\n\nA2"},
    ],
]
FAMILIES = {"llama3_1_tokenizer": "llama3_training.jinja", "qwen3_tokenizer": "qwen3_training.jinja"}


@pytest.fixture(params=sorted(FAMILIES), scope="module")
def family(request):
    """(ours, transformers.AutoTokenizer, TRL's {% generation %} training template) for one real tokenizer."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    folder = asset(request.param)
    training = Path(os.path.dirname(trl.__file__)) / "chat_templates" / FAMILIES[request.param]
    return load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder)), training.read_text()


def trained(sample: dict) -> list[int]:
    return [label for label in sample["labels"] if label != IGNORE_INDEX]


# --- rendering: text and ids equal transformers ----------------------------------------------------------


def test_own_template_text_and_ids_equal_transformers(family) -> None:
    ours, reference, _ = family
    for conversation in CONVERSATIONS:
        for generation_prompt in (False, True):
            kwargs = {"add_generation_prompt": generation_prompt}
            assert ours.apply_chat_template(conversation, tokenize=False, **kwargs) == reference.apply_chat_template(conversation, tokenize=False, **kwargs)
            expected = reference.apply_chat_template(conversation, tokenize=True, return_dict=True, **kwargs)["input_ids"]
            assert ours.apply_chat_template(conversation, **kwargs) == expected
            if not generation_prompt:
                assert encode_conversation(ours, conversation, ours.chat_template, 4096)["input_ids"] == expected


def test_generation_blocks_give_transformers_assistant_masks(family) -> None:
    ours, reference, training = family
    for conversation in CONVERSATIONS:
        sample = encode_conversation(ours, conversation, training, 4096)
        expected = reference.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=training)
        assert sample["input_ids"] == expected["input_ids"]
        assert sample["labels"] == [i if m else IGNORE_INDEX for i, m in zip(expected["input_ids"], expected["assistant_masks"])]


def test_masks_from_the_rendered_text_equal_the_training_templates(family) -> None:
    # The model's own template has no {% generation %} blocks: replies are found in the one rendering.
    # Two references no one here wrote: transformers' masks over TRL's marked copies of the same templates.
    ours, reference, training = family
    im_end_newline = {ours.token_to_id("<|im_end|>")}
    for conversation in CONVERSATIONS:
        sample = encode_conversation(ours, conversation, ours.chat_template, 4096)
        marked = reference.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=training)
        if marked["input_ids"] != sample["input_ids"]:
            continue  # TRL's Qwen 3 copy keeps every turn's reasoning: other ids, by its design
        expected = [i if m else IGNORE_INDEX for i, m in zip(marked["input_ids"], marked["assistant_masks"])]
        if ours.token_to_id("<|im_end|>") == ours.eos_id:
            # TRL's Qwen copy also trains the "\n" after <|im_end|>; we stop at the end-of-turn token
            expected = [IGNORE_INDEX if i > 0 and sample["input_ids"][i - 1] in im_end_newline else label for i, label in enumerate(expected)]
        assert sample["labels"] == expected


def test_qwen3_rendering_is_not_prefix_stable_and_we_render_once(family) -> None:
    ours, reference, _ = family
    conversation = CONVERSATIONS[3]
    whole = reference.apply_chat_template(conversation, tokenize=False)
    sample = encode_conversation(ours, conversation, ours.chat_template, 4096)
    assert ours.decode(sample["input_ids"]) == whole
    text = ours.decode(trained(sample))
    if "qwen" in str(ours.path):
        prefix = reference.apply_chat_template(conversation[:2], tokenize=False)
        assert "R1" in prefix and "R1" not in whole  # what prefix re-rendering would have trained on
        assert text == "A1<|im_end|><think>\nR2\n</think>\n\nA2<|im_end|>"  # trained as rendered
    else:
        assert text == "<think>\nR1\n</think>\n\nA1<|eot_id|><think>\nR2\n</think>\n\nA2<|eot_id|>"


def test_train_on_choices(family) -> None:
    ours, _, _ = family
    conversation = CONVERSATIONS[1]
    every = encode_conversation(ours, conversation, ours.chat_template, 4096, train_on="all")
    assert every["labels"] == every["input_ids"]
    last = encode_conversation(ours, conversation, ours.chat_template, 4096, train_on="last_assistant")
    assistant = encode_conversation(ours, conversation, ours.chat_template, 4096)
    assert "def f():\n    return 1" in ours.decode(trained(last)) and "Hello" not in ours.decode(trained(last))
    assert ours.decode(trained(assistant)).startswith("Hello! user")
    assert set(i for i, label in enumerate(last["labels"]) if label != IGNORE_INDEX) < set(i for i, label in enumerate(assistant["labels"]) if label != IGNORE_INDEX)


# --- built-in templates against reference strings -----------------------------------------------------------


def meta_llama2_dialog(dialog: list[dict]) -> list[tuple[str, str | None]]:
    """Meta's llama/generation.py `chat_completion` formatting: (user text, answer text) per turn, each
    to be encoded as BOS + text + EOS (the last user turn: BOS + text, no answer)."""
    B_INST, E_INST, B_SYS, E_SYS = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    return [(f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ", None) for prompt, answer in zip(dialog[::2], dialog[1::2])]


def test_llama2_builtin_equals_metas_format(llama) -> None:
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": " What is 2+2? "},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": " 6. "},
    ]
    text = render(LLAMA2, conversation, special_tokens=llama.special_tokens).text
    assert text == "".join(f"<s>{turn}</s>" for turn, _ in meta_llama2_dialog(conversation))
    # ids: Meta encodes each turn as [BOS] + sp.encode(turn) + [EOS]
    expected = [i for turn, _ in meta_llama2_dialog(conversation) for i in llama.encode(turn, add_bos=True, add_eos=True)]
    sample = encode_conversation(llama, conversation, LLAMA2, 4096)
    assert sample["input_ids"] == expected
    # each reply from its first piece ("▁4") through the " " the template writes before </s>, and </s>
    assert llama.decode(trained(sample)) == "4.  6. " and trained(sample)[-1] == llama.eos_id
    assert trained(sample).count(llama.eos_id) == 2
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        render(LLAMA2, conversation[1:2] * 2, special_tokens=llama.special_tokens)


def test_chatml_builtin_equals_the_reference_string() -> None:
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    assert render(CHATML, conversation).text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert render(CHATML, conversation[:2], add_generation_prompt=True).text.endswith("<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")


def test_alpaca_builtin_is_the_alpaca_prompt_and_gives_the_instruct_ids(llama, alpaca_tiny_path) -> None:
    records = [r for r in json.loads(alpaca_tiny_path.read_text()) if not r["input"]]
    assert len(records) == 54
    for record in records:
        conversation = [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["output"]}]
        text = render(ALPACA, conversation, special_tokens=llama.special_tokens).text
        assert text == "<s>" + record["text"] + "</s>"  # Stanford Alpaca's own rendering, framed
        sample = encode_conversation(llama, conversation, ALPACA, 4096)
        instruct = encode_sample(llama, ALPACA_PROMPT.format(record["instruction"]), record["output"], 4096)
        assert sample["input_ids"] == instruct["input_ids"] and sample["labels"] == instruct["labels"]


def test_resolve_template(tmp_path) -> None:
    assert resolve_template("chatml", None) == (CHATML, "built-in 'chatml'")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    # A syntax error is found when the template is chosen and names it, not the first record it renders.
    with pytest.raises(ChatTemplateError, match=rf"^data\.chat_template: {re.escape(str(broken))}: the chat template does not compile \(line 2: unexpected '}}'\)$"):
        resolve_template(str(broken), None, where="data.chat_template")
    with pytest.raises(ChatTemplateError, match=r"^chat_template: the tokenizer's own: the chat template does not compile"):
        resolve_template(None, "{% if %}")
    assert resolve_template(None, "{{ x }}")[0] == "{{ x }}"
    with pytest.raises(ChatTemplateError, match="has no chat template; set it to a built-in"):
        resolve_template(None, None)
    with pytest.raises(ChatTemplateError, match="neither a built-in .* nor an existing Jinja file"):
        resolve_template("nope.jinja", None)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render("{% if %}", [])


# --- record formats and bad input ---------------------------------------------------------------------------


def test_openai_and_sharegpt_records_normalise_identically() -> None:
    openai = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    sharegpt = [{"from": "system", "value": "S"}, {"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]
    assert normalize_messages(openai, DEFAULT_ROLE_MAP, OPENAI_COLUMNS, "r") == openai
    assert normalize_messages(sharegpt, DEFAULT_ROLE_MAP, SHAREGPT_COLUMNS, "r") == openai
    custom = [{"speaker": "bot", "text": "A", "reasoning_content": None}, {"speaker": "me", "text": "U"}]
    columns = {"messages": "turns", "role": "speaker", "content": "text"}
    assert normalize_messages(custom[::-1], {"bot": "assistant", "me": "user"}, columns, "r") == [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize(
    "messages, message",
    [
        (None, r"data\.jsonl: record 7: no messages"),
        ([], r"data\.jsonl: record 7: no messages"),
        ("hello", r"record 7: column 'messages' is a str, expected a list of messages"),
        ([{"role": "robot", "content": "x"}], r"record 7, message 0: unknown role 'robot' \(known: .*; add it to role_map\)"),
        ([{"role": "user", "content": 3}], r"record 7, message 0 \(user\): content must be a string, got int"),
        ([{"role": "user"}], r"record 7, message 0 \(user\): content must be a string, got nothing"),
        ([{"role": "user", "content": "hi"}], r"record 7: no assistant turn"),
    ],
)
def test_bad_records_give_one_line(messages, message) -> None:
    with pytest.raises(DataError, match=message) as error:
        normalize_messages(messages, DEFAULT_ROLE_MAP, OPENAI_COLUMNS, "data.jsonl: record 7")
    assert "\n" not in str(error.value)


def test_setup_checks_name_the_record(llama) -> None:
    conversation = CONVERSATIONS[0]
    double_bos = "{{ bos_token }}" + LLAMA2
    with pytest.raises(DataError, match=r"chat\.jsonl: record 2: 2 BOS tokens \('<s>'\), two in a row at token 1"):
        encode_conversation(llama, conversation, double_bos, 512, where="chat.jsonl: record 2")
    no_stop = "{% for m in messages %}{{ bos_token if loop.first }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match=r"record 2: no end-of-turn token \('</s>'\) is trained"):
        encode_conversation(llama, conversation, no_stop, 512, where="record 2")
    failing = "{{ raise_exception('no tools here') }}"
    with pytest.raises(DataError, match=r"record 2: the chat template failed to render: no tools here"):
        encode_conversation(llama, conversation, failing, 512, where="record 2")
    for arithmetic, raised in (("{{ 1 / 0 }}", "ZeroDivisionError"), ("{% for i in range(10**12) %}{% endfor %}", "OverflowError")):  # #29: tracebacks before
        with pytest.raises(DataError, match=rf"record 2: the chat template failed to render: {raised}"):
            encode_conversation(llama, conversation, arithmetic, 512, where="record 2")
    rewriting = "{{ bos_token }}{% for m in messages %}{{ m['content'] | upper }}{{ eos_token }}{% endfor %}"
    with pytest.raises(DataError, match=r"record 2, message 1 \(assistant\): its text does not appear"):
        encode_conversation(llama, conversation, rewriting, 512, where="record 2")


def test_truncation_choices(llama) -> None:
    conversation = CONVERSATIONS[1]
    full = encode_conversation(llama, conversation, LLAMA2, 4096)
    n = len(full["input_ids"]) - 5
    start = encode_conversation(llama, conversation, LLAMA2, n)
    assert start["truncated"] and start["keep"] and start["input_ids"] == full["input_ids"][:n] and start["labels"] == full["labels"][:n]
    end = encode_conversation(llama, conversation, LLAMA2, n, truncation="keep_end")
    assert end["input_ids"] == full["input_ids"][:1] + full["input_ids"][6:] and end["labels"][0] == IGNORE_INDEX
    assert not encode_conversation(llama, conversation, LLAMA2, n, truncation="drop")["keep"]
    assert not encode_conversation(llama, conversation, LLAMA2, 8)["keep"]  # nothing trained left after the cut
    assert full["truncated"] is False and full["keep"] is True


def test_chat_demo_is_reproducible_and_every_conversation_trains_its_replies() -> None:
    from lightning_tune.data.demo import make_chat_demo

    records = make_chat_demo.chat_demo_records()
    shipped = make_chat_demo.ASSETS / "chat_demo.jsonl"
    assert make_chat_demo.chat_demo_jsonl(records) == shipped.read_text(encoding="utf-8")
    assert len(records) == 800 and all(2 <= sum(m["role"] == "assistant" for m in r["messages"]) <= 3 for r in records)
    demo = load_tokenizer(make_chat_demo.ASSETS / "demo_tokenizer.model")
    for index, record in enumerate(records):
        messages = normalize_messages(record["messages"], DEFAULT_ROLE_MAP, OPENAI_COLUMNS, f"record {index}")
        sample = encode_conversation(demo, messages, LLAMA2, 256, where=f"record {index}")
        assert not sample["truncated"]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        text = demo.decode(trained(sample))  # replies, each with its " " and </s> (which decodes as nothing)
        assert text.split() == " ".join(replies).split(), index
        assert trained(sample).count(demo.eos_id) == len(replies)


# --- conversations with tool calls ----------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
]


def test_tool_calls_train_as_the_template_writes_them_qwen3() -> None:
    """Qwen 3's own template lists `tools` in its system turn and writes each call as <tool_call> JSON: text and ids
    equal transformers' `apply_chat_template(tools=...)`; the model's part of the calls' turn (after its generation
    prompt, through <|im_end|>) trains, the tool's answer does not. (TRL's marked Qwen 3 copy renders this turn with
    its own think block, so its masks are not comparable here.)"""
    transformers = pytest.importorskip("transformers")
    folder = asset("qwen3_tokenizer")
    ours, reference = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = normalize_messages(TOOL_CONVERSATION, DEFAULT_ROLE_MAP, OPENAI_COLUMNS, "record 0")  # content None -> "" for a turn of calls
    sample = encode_conversation(ours, messages, ours.chat_template, 4096, tools=TOOLS)
    assert ours.apply_chat_template(messages, tools=TOOLS, tokenize=False) == reference.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert sample["input_ids"] == reference.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    assert ours.decode(trained(sample)) == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|><think>\n\n</think>\n\nIt is 21 degrees.<|im_end|>'


def test_tool_calls_train_as_the_template_writes_them_llama3_1() -> None:
    """Llama 3.1's full template (tests/fixtures/chat_templates) writes a call as a JSON object after the assistant
    header, ending in <|eot_id|>; the tool's answer is an ipython turn, not trained."""
    transformers = pytest.importorskip("transformers")
    folder = asset("llama3_1_tokenizer")
    template = (Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates" / "llama3_1_8b_instruct.jinja").read_text(encoding="utf-8")
    ours, reference = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = normalize_messages(TOOL_CONVERSATION, DEFAULT_ROLE_MAP, OPENAI_COLUMNS, "record 0")
    kwargs = dict(tools=TOOLS, chat_template=template, date_string="26 Jul 2024")
    assert ours.apply_chat_template(messages, tokenize=False, **kwargs) == reference.apply_chat_template(messages, tokenize=False, **kwargs)
    sample = encode_conversation(ours, messages, template, 4096, tools=TOOLS)
    assert sample["input_ids"] == reference.apply_chat_template(messages, tools=TOOLS, chat_template=template, tokenize=True, return_dict=True)["input_ids"]
    assert ours.decode(trained(sample)) == '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>It is 21 degrees.<|eot_id|>'


def test_a_records_tools_reach_the_template_through_the_chat_module(tmp_path) -> None:
    """A JSON Lines record with `tools` (here a JSON string, as Hub data sets often store it) and a turn of tool calls
    whose content is null, as OpenAI writes it: the module checks its ids against the tokenizer's own template and
    transformers' with those tools; a tools value that is not a list of objects is one line naming the record."""
    from lightning_tune.data import ChatDataModule

    folder = asset("qwen3_tokenizer")
    path = tmp_path / "tools.jsonl"
    record = {"messages": TOOL_CONVERSATION, "tools": json.dumps(TOOLS)}
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "tools": TOOLS}) + "\n")
    dm = ChatDataModule(source=str(path), tokenizer_path=str(folder), cache_dir=str(tmp_path / "cache"), max_seq_len=1024, pack=False)
    dm.setup("fit")
    ours = load_tokenizer(folder)
    first, second = dm.train_dataset[0], dm.train_dataset[1]
    assert first["input_ids"] == second["input_ids"] and "get_weather" in ours.decode(first["input_ids"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({**record, "tools": "{not json"}) + "\n")
    bad = ChatDataModule(source=str(tmp_path / "bad.jsonl"), tokenizer_path=str(folder), cache_dir=str(tmp_path / "cache"), pack=False)
    with pytest.raises(DataError, match=r"bad\.jsonl: record 0 \(counting from 0\): tools is not valid JSON \(Expecting property name enclosed in double quotes at character 1\)"):
        bad.setup("fit")
