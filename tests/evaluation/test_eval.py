"""Evaluation with lm-evaluation-harness: our LM equals lm-eval's HFLM item by item, generate_until
equals our generate, the in-training callback logs metrics, and bad input is one line.

The model is a tiny random transformers Llama over the bundled demo SentencePiece tokenizer (512
pieces), saved with a transformers tokenizer built from the same pieces, so nothing is skipped and
nothing is downloaded: HFLM reads the directory with transformers, we read it with our own loader.
"""

import csv
import json
import re
import shutil
import socket
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
import transformers

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from lightning_tune.cli import main
from lightning_tune.cli.loading import load_for_eval
from lightning_tune.data.base import DEMO_TOKENIZER
from lightning_tune.evaluation import (
    TASKS_DIR,
    LightningTuneLM,
    run_tasks,
)
from lightning_tune.generate import generate

TASKS = ["lightning_tune"]  # the bundled group: multiple choice, generation, rolling log-likelihood
LIMIT = 4  # items per task compared with HFLM (of 8, 8 and 4): every request type, in a few seconds
SUBTASKS = ["lightning_tune_choice", "lightning_tune_generate", "lightning_tune_text"]


def transformers_tokenizer(model_file) -> transformers.PreTrainedTokenizerBase:
    """transformers' Llama tokenizer over a SentencePiece BPE model's pieces (no protobuf needed):
    the vocabulary by id, merges ranked by the merged piece's score, as transformers' converter does."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, i in vocab.items():
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        pairs = sorted(((piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab), key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += [(pair, sp.get_score(i)) for pair in pairs]
    merges = [pair for pair, _ in sorted(merges, key=lambda m: -m[1])]
    return transformers.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, legacy=False)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers (fp32), with tokenizer.json and tokenizer.model."""
    path = tmp_path_factory.mktemp("tiny_hf")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config)
    # A random model emits byte pieces that form invalid UTF-8, which SentencePiece and transformers
    # render differently (not what is tested here): their logits are 0, below the largest of the ~250
    # random others, so greedy text is made of whole pieces (and newlines: <0x0A> stays).
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_TOKENIZER))
    with torch.no_grad():
        for i in range(sp.get_piece_size()):
            if sp.is_byte(i) and sp.id_to_piece(i) != "<0x0A>":
                model.lm_head.weight[i] = 0
    model.save_pretrained(path)
    transformers_tokenizer(DEMO_TOKENIZER).save_pretrained(path)
    shutil.copy(DEMO_TOKENIZER, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def hf_results(hf_dir):
    """lm-eval's own HFLM on the directory: the reference."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    return model, run_tasks(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, device="cpu"), TASKS, limit=LIMIT, log_samples=True)


def by_doc(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def logit_scale(model, tokenizer, texts) -> float:
    """max |logit| of the reference model over `texts`: what fp32 logit errors are relative to."""
    with torch.no_grad():
        return max(model(torch.tensor([tokenizer.encode(t)])).logits.abs().max().item() for t in texts)


def continuation_tokens(tokenizer, context: str, continuation: str) -> int:
    """How many tokens a (context, continuation) request scores (lm-eval moves the context's trailing
    whitespace into the continuation)."""
    return len(tokenizer.encode(context + continuation)) - len(tokenizer.encode(context.rstrip()))


def test_tokenizers_agree_on_the_bundled_items(hf_dir):
    """The premise of the comparison: on every bundled text, transformers' ids are SentencePiece's."""
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_TOKENIZER))
    lines = [json.loads(line) for f in TASKS_DIR.glob("*.jsonl") for line in f.read_text().splitlines()]
    texts = [str(value) for record in lines for value in record.values() if isinstance(value, str) and value]
    assert len(texts) > 30
    assert all(hf.encode(text) == [sp.bos_id(), *sp.encode(text)] for text in texts)


@pytest.mark.parametrize("tokenizer_file", ["tokenizer.model", "tokenizer.json"])
def test_loglikelihoods_generations_and_metrics_equal_hflm(hf_dir, hf_results, tokenizer_file):
    reference_model, expected = hf_results
    model, tokenizer = load_for_eval(hf_dir, tokenizer_path=hf_dir / tokenizer_file)
    ours = run_tasks(LightningTuneLM(model, tokenizer, batch_size=4), TASKS, limit=LIMIT, log_samples=True)

    # Tolerance from the arithmetic: the project's fp32 bound on logits is 1e-5 of their largest
    # magnitude (different kernels, batch shapes and padding: tests/model/test_model.py), and a log-softmax
    # entry moves by at most twice the largest logit change, so a sum over n tokens may differ by
    # n * 2e-5 * max|logit|. max|logit| is read off the reference model on the bundled texts.
    texts = [s["arguments"][0][0] + s["arguments"][0][1] for s in by_doc(expected, "lightning_tune_choice")]
    texts += [s["arguments"][0][0] for s in by_doc(expected, "lightning_tune_text")]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    scale = logit_scale(reference_model, hf_tok, texts)

    def tol(n_tokens: int) -> float:
        return n_tokens * 2e-5 * scale

    for ref, got in zip(by_doc(expected, "lightning_tune_choice"), by_doc(ours, "lightning_tune_choice")):
        assert ref["arguments"] == got["arguments"]
        for (context, continuation), (ref_ll, ref_greedy), (got_ll, got_greedy) in zip(ref["arguments"], [r[0] for r in ref["resps"]], [r[0] for r in got["resps"]]):
            assert abs(got_ll - ref_ll) <= tol(continuation_tokens(hf_tok, context, continuation)), (continuation, got_ll, ref_ll)
            assert got_greedy == ref_greedy
    for ref, got in zip(by_doc(expected, "lightning_tune_text"), by_doc(ours, "lightning_tune_text")):
        n = len(hf_tok.encode(ref["arguments"][0][0])) + 1  # every token plus BOS, as HFLM scores it
        assert abs(got["resps"][0][0] - ref["resps"][0][0]) <= tol(n)
    for ref, got in zip(by_doc(expected, "lightning_tune_generate"), by_doc(ours, "lightning_tune_generate")):
        assert got["resps"] == ref["resps"]  # greedy text, cut at the same stop string
    for task in SUBTASKS:
        metrics = [m for m in expected["results"][task] if m.endswith(",none") and "_stderr" not in m]
        assert metrics
        for metric in metrics:
            value = expected["results"][task][metric]
            if "perplexity" in metric or "bits_per_byte" in metric:  # exp/log of the summed log-likelihoods
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
            else:  # accuracy, exact match: the same choices and texts
                assert ours["results"][task][metric] == value, (task, metric)


def test_peft_adapter_equals_hflm_over_peft_merged_model(hf_dir, tmp_path):
    """--adapter_dir: our unmerged LoRA layers score as HFLM does over PEFT's own merge of the adapter."""
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)  # B != 0: it changes the scores
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    merged = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), tmp_path / "adapter").merge_and_unload().eval()
    tasks = ["lightning_tune_choice"]
    expected = run_tasks(HFLM(pretrained=merged, tokenizer=transformers.AutoTokenizer.from_pretrained(hf_dir), batch_size=4, device="cpu"), tasks, limit=2, log_samples=True)
    model, tokenizer = load_for_eval(hf_dir, adapter_dir=tmp_path / "adapter")
    ours = run_tasks(LightningTuneLM(model, tokenizer), tasks, limit=2, log_samples=True)
    tokens = torch.tensor([tokenizer.encode("Add the two numbers.")])
    with torch.no_grad():
        assert (model(tokens) - load_for_eval(hf_dir)[0](tokens)).abs().max() > 1e-2  # the adapter is applied
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    samples = by_doc(expected, tasks[0])
    scale = logit_scale(merged, hf_tok, [a + b for s in samples for a, b in s["arguments"]])
    for ref, got in zip(samples, by_doc(ours, tasks[0])):
        # As in the HFLM comparison: n tokens * 2 * 1e-5 * max|logit| (PEFT's merge rounds W + s*BA once
        # in fp32, a relative 1e-7 per weight, well inside that bound).
        for (context, continuation), r, g in zip(ref["arguments"], ref["resps"], got["resps"]):
            assert abs(g[0][0] - r[0][0]) <= continuation_tokens(hf_tok, context, continuation) * 2e-5 * scale


def test_generate_until_equals_generate(hf_dir):
    model, tokenizer = load_for_eval(hf_dir, tokenizer_path=hf_dir / "tokenizer.model")
    lm = LightningTuneLM(model, tokenizer, batch_size=2)  # 2 per batch: padding and batches both exercised
    prompts = ["Add the two numbers.\n3 + 4\n", "Count from 2 to 9:", "Reverse the order of the list: cup, pen, box, lamp, and tree"]
    full = [tokenizer.decode(ids) for ids in generate(model, [tokenizer.encode(p) for p in prompts], 12, eos_id=tokenizer.eos_id)]
    stops = [text[3:5] for text in full]  # a stop string that really occurs: decoding ends early there
    assert all(len(s) == 2 for s in stops)
    requests = [Instance("generate_until", {}, (p, {"until": [s], "max_gen_toks": 12}), 0) for p, s in zip(prompts, stops)]
    requests.append(Instance("generate_until", {}, (prompts[0], {"until": ["\x00never"], "max_gen_toks": 12}), 0))
    assert lm.generate_until(requests) == [text.split(stop)[0] for text, stop in zip(full, stops)] + [full[0]]


def test_chat_template_prompts_are_the_tokenizers_rendering_and_ids(hf_dir, tmp_path):
    """--apply_chat_template: each prompt is the tokenizer's own chat rendering of the bundled Alpaca
    prompt, tokenised as the chat recipes tokenise it (template's special-token strings are tokens)."""
    from lightning_tune.data.templates import ALPACA

    chat_dir = tmp_path / "chat"
    shutil.copytree(hf_dir, chat_dir)
    template = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    (chat_dir / "chat_template.jinja").write_text(template)
    model, tokenizer = load_for_eval(chat_dir, tokenizer_path=chat_dir / "tokenizer.model")
    lm = LightningTuneLM(model, tokenizer)
    samples = run_tasks(lm, ["lightning_tune_choice"], limit=2, log_samples=True, apply_chat_template=True)["samples"]["lightning_tune_choice"]
    for sample in samples:
        doc = sample["doc"]
        messages = [{"role": "user", "content": ALPACA.format(doc["instruction"], doc["input"])}]
        context = sample["arguments"][0][0]
        assert context == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert lm.tok_encode(context) == ids and ids.count(tokenizer.bos_id) == 1 and tokenizer.eos_id in ids


@pytest.fixture
def network_attempts(monkeypatch):
    """Every internet connection attempted (each also fails): evaluation must make none."""
    attempts = []
    connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"test: no network ({address})")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


def test_callback_logs_metrics_and_they_are_the_trained_models(tmp_path, capsys, network_attempts):
    run = tmp_path / "run"
    extra = tmp_path / "eval.yaml"
    callback = {"class_path": "lightning_tune.LMEvalCallback", "init_args": {"tasks": TASKS, "every_n_steps": 2, "limit": 2, "batch_size": 4}}
    checkpoints = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True}}
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run), "name": "logs"}}
    trainer = {"max_steps": 3, "enable_progress_bar": False, "default_root_dir": str(run), "val_check_interval": None, "limit_val_batches": 0, "logger": logger, "callbacks": [checkpoints, callback]}
    extra.write_text(json.dumps({"trainer": trainer, "data": {"val_size": 0}}))
    assert main(["fit", "--config", "tiny_full.yaml", "--config", str(extra)]) == 0  # full: the .ckpt holds every weight
    with open(next(run.rglob("metrics.csv"))) as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("eval/lightning_tune_choice/acc")]
    assert [int(r["step"]) for r in rows] == [2, 3]  # every 2 steps, and at the end of fit
    for name in ("lightning_tune_choice/acc_norm", "lightning_tune_generate/exact_match", "lightning_tune_text/bits_per_byte"):
        assert all(r[f"eval/{name}"] != "" for r in rows), name
    last = {k: float(v) for k, v in rows[-1].items() if k.startswith("eval/")}

    # The last evaluation is of the model the run saved and exported: `eval --ckpt_path last.ckpt`
    # (the recipe rebuilt from the checkpoint) and eval of merged/ give the same scores.
    capsys.readouterr()
    assert main(["eval", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--limit", "2", "--device", "cpu", "--output_path", str(tmp_path / "r.json")]) == 0
    assert "| - lightning_tune_choice" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())["results"]
    for task, metric in [("lightning_tune_choice", "acc"), ("lightning_tune_choice", "acc_norm"), ("lightning_tune_generate", "exact_match"), ("lightning_tune_text", "bits_per_byte")]:
        assert last[f"eval/{task}/{metric}"] == pytest.approx(saved[task][f"{metric},none"], rel=1e-6), (task, metric)
    model, tokenizer = load_for_eval(run / "merged")
    merged = run_tasks(LightningTuneLM(model, tokenizer), ["lightning_tune_text"], limit=2)["results"]["lightning_tune_text"]
    assert last["eval/lightning_tune_text/bits_per_byte"] == pytest.approx(merged["bits_per_byte,none"], rel=1e-6)
    assert network_attempts == []


def test_eval_help_lists_the_options_without_importing_torch_or_lm_eval():
    code = "import sys; from lightning_tune.cli import main\ntry: main(['eval', '--help'])\nexcept SystemExit: pass\nprint([m for m in ('torch', 'lm_eval') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--tasks" in result.stdout and "--include_path" in result.stdout and "--apply_chat_template" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def one_error_line(capsys) -> str:
    # datasets' progress bar while it first converts a task's data file into its cache (shown only when that
    # file is not cached yet, so it depends on which test ran first) is progress, not a message about the error.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not re.match(r"Generating \w+ split: ", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_unknown_task_is_one_line(hf_dir, capsys, monkeypatch):
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's own ~15,000 task files takes seconds; this test is about our message, so the
    # full index is built without them (the name is unknown either way).
    build = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, include_defaults=True, **k: build(self, *a, include_defaults=False, **k))
    assert main(["eval", "--checkpoint_dir", str(hf_dir), "--tasks", "lightning_tune,no_such_task"]) == 2
    assert "unknown task(s) ['no_such_task']" in one_error_line(capsys)


def test_task_whose_data_is_on_the_hub_is_one_line_offline(hf_dir, tmp_path, capsys, network_attempts):
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: someone/not_in_the_cache\noutput_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n"
    )
    assert main(["eval", "--checkpoint_dir", str(hf_dir), "--tasks", "hub_task", "--include_path", str(tmp_path), "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert "someone/not_in_the_cache" in line and "--offline false" in line
    assert network_attempts == []


def test_missing_lm_eval_is_one_line(hf_dir, capsys, monkeypatch):
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing any of lm_eval now raises ImportError
    monkeypatch.delitem(sys.modules, "lightning_tune.evaluation")
    monkeypatch.delitem(sys.modules, "lightning_tune.evaluation.harness")  # the module that imports lm-eval
    assert main(["eval", "--checkpoint_dir", str(hf_dir)]) == 2
    line = one_error_line(capsys)  # #30: never PyPI's lightning-tune (another project): the real package, or this checkout's extra
    assert "lm-eval is not installed: pip install 'lm-eval[hf]>=0.4.13' (in a lightning_tune checkout: pip install -e '.[eval]')" in line and "lightning_tune[" not in line


def test_unreadable_checkpoints_are_one_line(hf_dir, tmp_path, capsys):
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(hf_dir / "config.json", no_tokenizer)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    garbage = tmp_path / "last.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint")
    for args, expected in [
        (["--checkpoint_dir", str(broken)], "config.json"),
        (["--ckpt_path", str(garbage)], "last.ckpt"),
        (["--checkpoint_dir", str(tmp_path / "absent")], "no such checkpoint"),
        (["--checkpoint_dir", str(no_tokenizer)], "neither tokenizer.json nor tokenizer.model"),  # before any weight is read
        (["--checkpoint_dir", str(broken), "--ckpt_path", str(garbage)], "exactly one of"),
    ]:
        assert main(["eval", *args, "--device", "cpu"]) == 2
        assert expected in one_error_line(capsys), args


def test_lora_checkpoint_of_a_random_base_is_refused(tmp_path, capsys):
    """Its checkpoints hold the adapters only: the base it trained on cannot be rebuilt."""
    from lightning_tune.recipes import LoRAFinetune

    module = LoRAFinetune(model_name="tiny_llama2", model_args={"vocab_size": 512, "num_layers": 1}, tokenizer_path=str(DEMO_TOKENIZER))
    module.configure_model()
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, tmp_path / "last.ckpt")
    assert main(["eval", "--ckpt_path", str(tmp_path / "last.ckpt"), "--device", "cpu"]) == 2
    assert "random-init base, which its checkpoints do not store; use the run's merged/" in one_error_line(capsys)


# A task file of the user's that lm-eval cannot use: one line naming the task and its file, not
# lm-eval's traceback (a bad aggregation raised `TypeError: 'NoneType' object is not callable` after
# the whole evaluation had run; a YAML syntax error made the task "unknown" with no reason).
TASK = (
    "task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: 'DATA'}}\ntest_split: test\noutput_type: multiple_choice\n"
    "doc_to_text: '{{instruction}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"metric_list": "\n  - metric: acc\n    aggregation: no_such_aggregation"}, "t.yaml): metric(s) ['acc'] have an unknown aggregation"),
        ({"metric_list": "\n  - metric: no_such_metric"}, "t.yaml): lm-eval cannot build this task: KeyError: None (a metric_list entry names a metric or aggregation"),
        ({"output_type": " nonsense"}, "t.yaml): lm-eval cannot build this task: ValueError: Got invalid output_type 'nonsense'"),
        ({"doc_to_text": " '{% if %}'"}, "t.yaml): lm-eval cannot build this task: TemplateSyntaxError: Expected an expression"),
        ({"metric_list": " [\n"}, "unknown task(s) ['t']"),
    ],
    ids=["aggregation", "metric", "output_type", "template", "yaml_syntax"],
)
def test_bad_task_file_is_one_line_naming_it(hf_dir, tmp_path, capsys, network_attempts, change, expected):
    lines = [line for line in TASK.replace("DATA", str(TASKS_DIR / "demo_choice.jsonl")).splitlines() if line.split(":")[0] not in change]
    (tmp_path / "t.yaml").write_text("\n".join(lines + [f"{key}:{value}" for key, value in change.items()]) + "\n")
    assert main(["eval", "--checkpoint_dir", str(hf_dir), "--tasks", "t", "--include_path", str(tmp_path), "--device", "cpu", "--limit", "2"]) == 2
    line = one_error_line(capsys)
    assert expected in line and line.startswith("error: tasks: ")
    if change.get("metric_list") == " [\n":
        assert f"{tmp_path / 't.yaml'}: line " in line and "not valid YAML" in line
