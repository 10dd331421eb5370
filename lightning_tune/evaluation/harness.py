"""Benchmarks with lm-evaluation-harness on our own model: no conversion, no download, batched, KV-cached.

`LightningTuneLM` is lm-eval's `TemplateLM` over a `CausalLM` and a tokenizer. It reproduces what
lm-eval's `HFLM` does with a Hugging Face checkpoint, step for step, so scores are comparable with
published `hf` numbers (tests/evaluation/test_eval.py compares per-item log-likelihoods and metrics with HFLM):

- context/continuation: trailing whitespace of the context moves to the continuation, the pair is
  encoded whole (BOS first) and the continuation is what follows the context's own tokens
  (`TemplateLM._encode_pair`); an empty context is BOS alone; inputs are left-truncated to the
  model's context length + 1 and the last token dropped.
- requests are sorted longest first and batched (lm-eval's `Collator`, one-token continuations of one
  context share a forward pass); rows are right-padded, which a causal model never attends to.
  The output head runs only where a continuation token is scored, not over the whole batch.
- rolling log-likelihood: the text with BOS (as HFLM's `tok_encode` gives it) in disjoint windows of
  the context length, each window conditioned on the one token before it (BOS for the first).
- `generate_until`: greedy (or sampled) with `lightning_tune.generate` (left-padded batches and the KV
  cache), stopping once every row has produced EOS or one of the stop strings, whose first occurrence
  then ends the text.

The tokenizer is ours (SentencePiece or tokenizer.json), the one the model was trained with. Where it
differs from transformers' (transformers 5's Llama tokenizer encodes a text that *starts* with a space
without SentencePiece's extra "▁"), our ids are the SentencePiece ones.

This module needs lm-eval (`pip install 'lm-eval[hf]>=0.4.13'`, or `pip install -e '.[eval]'` in a checkout); importing it without raises one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch import Tensor

from lightning_tune.generate import generate
from lightning_tune.model import CausalLM
from lightning_tune.tokenizer.chat_template import ChatTemplateError

INSTALL_HINT = "lm-eval is not installed: pip install 'lm-eval[hf]>=0.4.13' (in a lightning_tune checkout: pip install -e '.[eval]')"
# The offline demo tasks shipped with the package (lightning_tune_choice / _generate / _text and the
# group lightning_tune that runs all three).
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BUNDLED_GROUP = "lightning_tune"


class EvalError(ValueError):
    """A user mistake in an evaluation request (task name, checkpoint, generation setting); one line."""


try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import (
        Collator,
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise EvalError(INSTALL_HINT) from None


class _NoCustomDatasetNote(logging.Filter):
    """Drops lm-eval's note on `custom_dataset` (how to pass --metadata), printed for every local-data task."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_NoCustomDatasetNote())


class EvalTokenizer(Protocol):
    """What evaluation needs from a tokenizer (`lightning_tune.tokenizer.load_tokenizer`'s provide it;
    `eos_ids`, `pad_id`, `special_tokens` and `token_to_id` are used where present)."""

    bos_id: int | None
    eos_id: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _bos_text(tokenizer: EvalTokenizer) -> str | None:
    """The BOS token as text ("<s>"): a prompt that already starts with it gets no second BOS (as HFLM)."""
    text = (getattr(tokenizer, "special_tokens", None) or {}).get("bos_token")
    return text if isinstance(text, str) and text and tokenizer.bos_id is not None else None


def _special_ids(tokenizer: EvalTokenizer) -> set[int]:
    """Ids that HFLM's `decode(..., skip_special_tokens=True)` leaves out of generated text."""
    ids = {tokenizer.eos_id, *getattr(tokenizer, "eos_ids", ())}
    if tokenizer.bos_id is not None:
        ids.add(tokenizer.bos_id)
    token_to_id = getattr(tokenizer, "token_to_id", None)
    for text in (getattr(tokenizer, "special_tokens", None) or {}).values():
        index = token_to_id(text) if token_to_id is not None else None
        if index is not None:
            ids.add(index)
    return ids


class _StopGeneration(Exception):
    """Raised from generate's per-step callback once every row is finished; ends decoding early."""


class _StopWatcher:
    """An `on_tokens` callback that records each row's new tokens and stops when every row is done.

    A row is done at its first EOS or once its decoded text contains a stop string. Stopping is only
    an economy: the text is cut at the first stop string afterwards, exactly as if decoding had run
    to `max_gen_toks`, so the result does not depend on when the loop ended.
    """

    def __init__(self, decode: Callable[[list[int]], str], rows: int, stops: list[str], end_ids: set[int]) -> None:
        self.decode, self.stops, self.end_ids = decode, [s for s in stops if s], end_ids
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows

    def __call__(self, step_tokens: Tensor) -> None:
        for row, token in enumerate(step_tokens.tolist()):
            if self.done[row]:
                continue
            self.tokens[row].append(token)
            if token in self.end_ids or any(s in self.decode(self.tokens[row]) for s in self.stops):
                self.done[row] = True
        if all(self.done):
            raise _StopGeneration


class LightningTuneLM(TemplateLM):
    """lm-eval's language-model interface over a `CausalLM` (in eval mode, on its device) and its tokenizer.

    Args:
        model: the model; evaluated as it is (eval mode, no gradients); its dtype and device are kept.
        tokenizer: encode/decode with BOS/EOS ids (see `EvalTokenizer`).
        batch_size: requests per forward pass (log-likelihoods) or per generation batch.
        max_gen_toks: new tokens per generation when a task does not say (HFLM's default, 256).
        max_length: context length; default the model's `max_seq_len` (HFLM: max_position_embeddings).
        autocast: a context manager factory entered around every forward (e.g. the Trainer's precision).
        chat: prompts are chat-template renderings (`apply_chat_template`): the special-token strings
            in them are those tokens, as the chat recipes and `generate`'s chat path tokenise them.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: EvalTokenizer,
        batch_size: int = 8,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        autocast: Any = None,
        chat: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise EvalError(f"batch_size: must be >= 1, got {batch_size}")
        if max_gen_toks < 1:
            raise EvalError(f"max_gen_toks: must be >= 1, got {max_gen_toks}")
        self.model = model
        self.tokenizer_ours = tokenizer
        self.batch_size = batch_size
        self._max_gen_toks = max_gen_toks
        self._max_length = max_length or model.config.max_seq_len
        self._autocast = autocast or contextlib.nullcontext
        self.chat = chat
        self._bos_text = _bos_text(tokenizer)
        self._skip_ids = _special_ids(tokenizer)
        self._end_ids = {tokenizer.eos_id, *getattr(tokenizer, "eos_ids", ())}  # any of them ends a generation
        pad = getattr(tokenizer, "pad_id", 0)
        self.pad_id = pad if isinstance(pad, int) and pad >= 0 else 0

    # ---- what lm-eval asks of a model -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_ours.eos_id

    @property
    def prefix_token_id(self) -> int:
        """Conditions an empty context and the first rolling window: BOS (HFLM: BOS, else EOS)."""
        bos = self.tokenizer_ours.bos_id
        return bos if bos is not None and bos >= 0 else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        """Ids of `string`; BOS first unless `add_special_tokens` is False (HFLM's Llama default).

        A string that already starts with the BOS text ("<s>", e.g. from a chat template) keeps that
        one BOS, as HFLM does.
        """
        add_bos = True if add_special_tokens is None else bool(add_special_tokens)
        tokenizer = self.tokenizer_ours
        if self.chat and hasattr(tokenizer, "encode_with_offsets"):
            ids = tokenizer.encode_with_offsets(string, chat=True)[0]  # no BOS beyond what the template wrote
            if add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
                ids = [tokenizer.bos_id, *ids]
        else:
            if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
                string, add_bos = string[len(self._bos_text) :], True
            ids = tokenizer.encode(string, add_bos=add_bos, add_eos=False)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        """Text of `tokens` without special tokens (HFLM decodes with skip_special_tokens=True)."""
        return self.tokenizer_ours.decode([t for t in tokens if t not in self._skip_ids])

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer in lm-eval's request caches."""
        return str(getattr(self.tokenizer_ours, "path", type(self.tokenizer_ours).__name__)).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat template (recorded by lm-eval's tracker), None when not applying one."""
        if not chat_template:
            return None
        return getattr(self.tokenizer_ours, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The few-shot conversation rendered with the tokenizer's chat template, as HFLM renders it:
        a generation prompt after it, or else the last (assistant) message left open to continue.
        A template that refuses a system message is retried without it (as HFLM does)."""
        try:
            text = self.tokenizer_ours.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt, tokenize=False)
        except ChatTemplateError:
            if not any(m["role"] == "system" for m in chat_history):
                raise
            chat_history = [m for m in chat_history if m["role"] != "system"]
            text = self.tokenizer_ours.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt, tokenize=False)
        if not add_generation_prompt:  # transformers' continue_final_message: cut after the last content
            final = chat_history[-1]["content"].strip()
            if final not in text:
                raise EvalError("the chat template does not render the last message's text verbatim; cannot continue it")
            text = text[: text.rindex(final) + len(final)]
        return text

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results JSON."""
        weight = self.model.lm_head.weight
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()), "model_dtype": str(weight.dtype), "model_device": str(weight.device)}

    # ---- log-likelihoods --------------------------------------------------------------------

    @torch.no_grad()
    def _continuation_logprobs(self, rows: list[list[int]], cont_lens: list[int]) -> list[Tensor]:
        """Log-probabilities [n_i, V] (fp32) of the next token at each row's last `n_i` positions.

        rows are right-padded into one [B, T] batch; the head is applied only at the scored positions.
        """
        T = max(len(r) for r in rows)
        tokens = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        with self._autocast():
            hidden = self.model.hidden_states(tokens.to(self.device))  # [B, T, E]
            picked = torch.cat([hidden[b, len(row) - n : len(row)] for b, (row, n) in enumerate(zip(rows, cont_lens))])  # [sum n_i, E]
            logprobs = self.model.logits(picked).float().log_softmax(dim=-1)  # [sum n_i, V]
        return list(logprobs.split(cont_lens))

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        if not requests:
            return []

        def by_length(req: tuple[Any, list[int], list[int]]) -> tuple[int, tuple[int, ...]]:
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)  # longest first, as HFLM: the first batch is the largest

        order = Collator(requests, sort_fn=by_length, group_by="contexts", group_fn=lambda req: req[-2] + req[-1][:-1])
        results: list[tuple[float, bool]] = []
        for chunk in order.get_batched(n=override_bs or self.batch_size):
            rows, cont_lens = [], []
            for _, context_enc, continuation_enc in chunk:
                if not context_enc or not continuation_enc:
                    raise EvalError("a log-likelihood request has an empty context or continuation after tokenisation")
                if len(continuation_enc) > self.max_length:
                    raise EvalError(f"a continuation of {len(continuation_enc)} tokens exceeds the model's context length {self.max_length}")
                rows.append((context_enc + continuation_enc)[-(self.max_length + 1) :][:-1])  # the last token is only predicted
                cont_lens.append(len(continuation_enc))
            for (request, context_enc, continuation_enc), logprobs in zip(chunk, self._continuation_logprobs(rows, cont_lens)):
                greedy = logprobs.argmax(dim=-1)[None]  # [1, n]
                # Requests that differ only in a one-token continuation share this row's log-probabilities.
                for req_str, cont_toks, lp in order.get_cache(req_str=request, cxt_toks=context_enc, cont_toks=continuation_enc, logits=logprobs[None]):
                    cont = torch.tensor(cont_toks, dtype=torch.long, device=lp.device)[None]  # [1, n]
                    answer = (float(lp.gather(2, cont[..., None]).sum()), bool((greedy[:, -cont.shape[1] :] == cont).all()))
                    results.append(answer)
                    if req_str is not None:  # None: a rolling window (cached per text instead)
                        self.cache_hook.add_partial("loglikelihood", req_str, answer)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of the context length (see module doc)."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            token_windows = get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)
            for window in map(make_disjoint_window, token_windows):
                windows.append((None, *window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation -------------------------------------------------------------------------

    def _sampling(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Our generate()'s sampling arguments from lm-eval's normalised generation kwargs."""
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        seed = kwargs.pop("seed", None)
        if kwargs:
            raise EvalError(f"generation_kwargs {sorted(kwargs)} are not supported; expected until, max_gen_toks, do_sample, temperature, top_k, top_p, seed")
        if not do_sample:
            return {"temperature": 0.0}
        # do_sample without a temperature samples at 1.0, as transformers' generate does
        return {"temperature": temperature if temperature > 0 else 1.0, "top_k": top_k, "top_p": top_p, "seed": seed}

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, EOS or the task's max_gen_toks (default 256)."""

        def by_length(req: tuple[str, dict]) -> tuple[int, str]:
            return -len(self.tok_encode(req[0])), req[0]

        order = Collator([req.args for req in requests], sort_fn=by_length, group_by="gen_kwargs", group_fn=lambda req: req[1])
        results: list[str] = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            if not isinstance(all_kwargs[0], dict):
                raise EvalError(f"generation_kwargs must be a mapping, got {all_kwargs[0]!r}")
            kwargs = dict(normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks))
            stops = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            sampling = self._sampling(kwargs)
            room = self.max_length - max_gen_toks
            if room < 1:
                raise EvalError(f"max_gen_toks ({max_gen_toks}) must be less than the model's context length ({self.max_length})")
            prompts = [self.tok_encode(c, left_truncate_len=room) for c in contexts]  # as HFLM: keep the end
            watcher = _StopWatcher(self.tok_decode, len(prompts), stops, self._end_ids)
            with self._autocast(), contextlib.suppress(_StopGeneration):
                generate(self.model, prompts, max_gen_toks, eos_id=self.eot_token_id, pad_id=self.pad_id, on_tokens=watcher, **sampling)
            for context, tokens in zip(contexts, watcher.tokens):
                ends = [i for i, t in enumerate(tokens) if t in self._end_ids]
                tokens = tokens[: ends[0]] if ends else tokens
                text = postprocess_generated_text(generation=self.tok_decode(tokens), stop=stops, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        return order.get_original(results)


# --------------------------------------------------------------------------------------------------
# Choosing tasks, running the harness (the CLI opens the model: lightning_tune.cli.loading.load_for_eval)


@contextlib.contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """No Hugging Face Hub access while evaluating: a task whose data is not local fails at once
    instead of downloading. Sets the environment variables and the already-imported libraries' flags."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
    values = [getattr(obj, name) for obj, name in saved]
    os.environ.update({k: "1" for k in saved_env})
    for obj, name in saved:
        setattr(obj, name, True)
    try:
        yield
    finally:
        for (obj, name), value in zip(saved, values):
            setattr(obj, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def task_manager(tasks: Sequence[str], include_path: str | Path | Sequence[str | Path] | None = None) -> Any:
    """lm-eval's TaskManager over the bundled tasks and `include_path`, plus lm-eval's own tasks only
    when a name needs them (indexing its ~15,000 YAML files takes seconds). Unknown names: one line."""
    from lm_eval.tasks import TaskManager

    if isinstance(include_path, (str, Path)):
        include_path = [include_path]
    paths = [str(TASKS_DIR), *(str(Path(p).expanduser()) for p in include_path or [])]
    for p in paths[1:]:
        if not Path(p).is_dir():
            raise EvalError(f"include_path: {p} is not a directory (expected a folder of lm-eval task YAML files)")
    if not tasks:
        raise EvalError("tasks: give at least one task name (e.g. lightning_tune, the bundled offline demo)")
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(t in manager.all_tasks for t in tasks):
        return manager
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        bundled = ", ".join(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
        unreadable = "".join(f"; {problem}" for problem in _unreadable_task_files(paths[1:]))
        raise EvalError(f"tasks: unknown task(s) {unknown}; not in lm-eval's tasks, the bundled ones ({bundled}) or --include_path{unreadable}")
    return manager


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads a task file's YAML syntax only: lm-eval's own tags (`!function module.name`) become None, nothing is imported."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _unreadable_task_files(folders: Sequence[str]) -> list[str]:
    """The task YAML files under `folders` that are not YAML, as "FILE: line L: problem" (lm-eval skips
    them silently, so their task is then reported as unknown)."""
    problems = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                yaml.load(path.read_text(encoding="utf-8", errors="replace"), Loader=_TaskYamlLoader)
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f"line {mark.line + 1}: " if mark is not None else ""
                problems.append(f"{path}: {where}not valid YAML ({getattr(error, 'problem', None) or type(error).__name__})")
    return problems


def _entry_file(manager: Any, name: str) -> str:
    """The YAML file lm-eval's index holds for a task/group/tag name ("" when it has none)."""
    entry = manager.task_index.get(name)
    return f" ({entry.yaml_path})" if getattr(entry, "yaml_path", None) else ""


def load_tasks(manager: Any, tasks: Sequence[str]) -> list[Any]:
    """lm-eval's Task/Group objects for `tasks`, each built on its own so that a task file lm-eval
    cannot build (a template syntax error, an unknown metric or aggregation) is one line naming the
    task and its file instead of lm-eval's traceback."""
    from lm_eval.api.group import Group

    built: list[Any] = []
    for name in tasks:
        try:
            loaded = manager.load([name])
        except (EvalError, ConnectionError):  # ConnectionError: the caller explains --offline
            raise
        except Exception as error:  # lm-eval raises whatever its parsing of the user's file raises
            # lm-eval looks metrics and aggregations up in dicts: a bare KeyError says nothing of where.
            hint = " (a metric_list entry names a metric or aggregation lm-eval does not know)" if isinstance(error, KeyError) else ""
            raise EvalError(f"tasks: {name}{_entry_file(manager, name)}: lm-eval cannot build this task: {type(error).__name__}: {_first_line(error)}{hint}") from None
        for task_name, task in loaded["tasks"].items():
            bad = sorted(metric for metric, function in task.aggregation().items() if not callable(function))
            if bad:
                raise EvalError(f"tasks: {task_name}{_entry_file(manager, task_name)}: metric(s) {bad} have an unknown aggregation (expected e.g. mean, median, perplexity, bleu)")
        top = loaded["groups"].get(name)
        built.extend([top] if isinstance(top, Group) else loaded["tasks"].values())
    return built


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def run_tasks(
    lm: Any,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100000,
    offline: bool = True,
    manager: Any = None,
    apply_chat_template: bool = False,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` on `tasks`; returns the harness's results dict.

    Args:
        lm: an lm-eval LM (a `LightningTuneLM`, or lm-eval's HFLM for comparison).
        tasks: task or group names (`lightning_tune` is the bundled offline demo).
        num_fewshot: few-shot examples per prompt; default each task's own.
        limit: at most this many items per task (a fraction < 1: that share).
        include_path: directories of extra task YAML files.
        log_samples: keep every item's requests and responses under results["samples"].
        bootstrap_iters: resamples for the standard errors of non-mean metrics (0: none).
        offline: forbid Hugging Face Hub access (see `hub_offline`).
        manager: a TaskManager from `task_manager` to reuse (default: built here).
        apply_chat_template: render prompts (few-shot examples as turns) with the tokenizer's chat template.
    """
    import lm_eval

    if num_fewshot is not None and num_fewshot < 0:
        raise EvalError(f"num_fewshot: must be >= 0, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise EvalError(f"limit: must be > 0, got {limit}")
    if apply_chat_template and not getattr(getattr(lm, "tokenizer_ours", None), "chat_template", True):
        raise EvalError("apply_chat_template: the tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
    if isinstance(lm, LightningTuneLM):
        lm.chat = apply_chat_template
    with hub_offline(offline):
        manager = manager or task_manager(tasks, include_path)
        try:
            built = load_tasks(manager, tasks)
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=built,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=log_samples,
                bootstrap_iters=bootstrap_iters,
                apply_chat_template=apply_chat_template,
            )
        except ConnectionError as err:  # datasets: a task's data is neither local nor reachable
            hint = "; it is not in the local datasets cache: pass --offline false (offline=False) to download it" if offline else ""
            raise EvalError(f"tasks: {str(err).splitlines()[0]}{hint}") from None


def flat_metrics(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"PREFIX TASK/METRIC": value} for every numeric metric (lm-eval's ",none" filter suffix dropped,
    standard errors left out): the form a Lightning logger takes."""
    out = {}
    for task, metrics in {**results.get("results", {}), **results.get("groups", {})}.items():
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if not filter_name or "_stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            suffix = "" if filter_name == "none" else f"_{filter_name}"
            out[f"{prefix}{task}/{name}{suffix}"] = float(value)
    return out


def results_table(results: dict[str, Any]) -> str:
    """The harness's own Markdown table(s) of the results (tasks, then groups)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
