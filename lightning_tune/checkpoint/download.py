"""`python -m lightning_tune download REPO_ID`: fetch only what the recipes load from the Hugging Face Hub.

Weights (safetensors preferred, else PyTorch .bin, else Meta's consolidated.*.pth), the model config
and one tokenizer: the SentencePiece `tokenizer.model` where the repository has one (Llama 2,
Mistral), else `tokenizer.json` with its `tokenizer_config.json` / `chat_template.jinja` (Llama 3.x,
Qwen, SmolLM2); not the duplicate weight formats, the other tokenizer format, PDFs and so on.
`huggingface_hub.snapshot_download` does the transfer: its progress bar, resumable `.incomplete`
files (nothing half-written under the final names) and token handling. Hub failures become one
line saying what to do (exit 1); usage mistakes exit 2. The verb's arguments: `lightning_tune.cli.download`.
"""

from __future__ import annotations

import importlib
from fnmatch import fnmatch
from pathlib import Path

# Files besides the weights: configs (HF or Meta); then the tokenizer (`tokenizer_files`).
EXTRA_FILES = ("config.json", "generation_config.json", "params.json")
# The tokenizer: SentencePiece where there is one, else tokenizer.json and the files read beside it.
SENTENCEPIECE_FILES = ("tokenizer.model",)
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# Weight formats in order of preference: (weight files' pattern, their index file).
WEIGHT_FORMATS = (
    ("*.safetensors", "model.safetensors.index.json"),
    ("*.bin", "pytorch_model.bin.index.json"),
    ("consolidated.*.pth", None),
)


class DownloadError(Exception):
    """A Hub or network failure, printed as one line; exit code 1 (not the user's typing: retrying may work)."""

    exit_code = 1


def select_files(repo_files: list[str]) -> list[str]:
    """The files of a repository that lightning_tune loads: one weight format, configs, tokenizer.

    Only top-level files count: sub-folders (e.g. `original/`) hold other copies of the weights.
    """
    top = [f for f in repo_files if "/" not in f]
    for pattern, index in WEIGHT_FORMATS:  # noqa: B007 - `index` of the format found is used after the loop
        # consolidated.safetensors: Mistral's own format, beside the Hugging Face shards (a second copy)
        weights = sorted(f for f in top if fnmatch(f, pattern) and not f.startswith("training_args") and f != "consolidated.safetensors")
        if weights:
            break
    else:
        raise DownloadError("has no *.safetensors, *.bin or consolidated.*.pth weights at its top level; lightning_tune loads only those formats")
    if "config.json" not in top and "params.json" not in top:
        raise DownloadError("has no config.json or params.json, so the architecture is unknown; is it a model repository of a supported family (see lightning_tune.families)?")
    tokenizer = SENTENCEPIECE_FILES if "tokenizer.model" in top else TOKENIZER_JSON_FILES
    extras = [f for f in (index, *EXTRA_FILES, *tokenizer) if f is not None and f in top]
    return weights + extras


def network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning 'no connection': the hub's offline flag and its HTTP client's transport errors."""
    from huggingface_hub.utils import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    # The hub's HTTP client differs across versions (requests, httpx, httpx2): take whichever is there.
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def explain(err: BaseException, repo_id: str, has_token: bool) -> str:
    """One line that says what went wrong and what to do about it."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    url = f"https://huggingface.co/{repo_id}"
    login = "pass --hf_token, set HF_TOKEN or run `hf auth login`"
    if isinstance(err, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        if not has_token:
            return f"{repo_id} is gated and no Hugging Face token was found: accept its licence at {url}, create a token at https://huggingface.co/settings/tokens, then {login}"
        return f"{repo_id} is gated and your token has no access yet: request access at {url} (approval can take a while), then retry"
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id}: no such revision; check --revision (branch, tag or commit on {url})"
    if isinstance(err, RepositoryNotFoundError):
        hint = "" if has_token else f"; if it is private, {login}"
        return f"{repo_id}: no such repository on the Hugging Face Hub (check the spelling, e.g. meta-llama/Llama-2-7b-hf){hint}"
    if isinstance(err, (LocalEntryNotFoundError, *network_errors())):
        return f"cannot reach the Hugging Face Hub to download {repo_id} (offline, or HF_HUB_OFFLINE=1 is set): connect to the internet and unset HF_HUB_OFFLINE, or copy the files into --output_dir by hand"
    return f"{repo_id}: download failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def download(repo_id: str, output_dir: str | Path, hf_token: str | None = None, revision: str | None = None) -> list[Path]:
    """Download what the recipes need from `repo_id` into `output_dir`; return the local files."""
    from huggingface_hub import HfApi, get_token, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    token = hf_token or get_token()  # --hf_token, else HF_TOKEN or the stored `hf auth login`
    try:
        repo_files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
        try:
            files = select_files(repo_files)
        except DownloadError as err:
            raise DownloadError(f"{repo_id} {err}") from None
        snapshot_download(repo_id, revision=revision, local_dir=str(output_dir), allow_patterns=files, token=token)
    except (HfHubHTTPError, OSError, *network_errors()) as err:
        raise DownloadError(explain(err, repo_id, has_token=token is not None)) from err
    return [Path(output_dir) / f for f in files]
