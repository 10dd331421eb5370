"""The Llama 2 SentencePiece tokenizer, a thin wrapper that adds BOS/EOS, a pad id and continuation encoding.

Token ids come from the `sentencepiece` library itself (tests compare against it); this file only
decides which special ids go where.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    """A SentencePiece model (Llama 2's, or the bundled demo one) with the ids a fine-tuning recipe needs.

    `pad_id` is 0, Llama's `<unk>`: Llama 2 has no pad piece and its byte-fallback model never emits
    `<unk>` (unknown characters become `<0x..>` byte pieces). Reusing it for padding is safe because
    batches are right-padded, attention is causal (real tokens sit before the padding and never attend
    to it) and padded labels are -100, so pad positions never influence real tokens or the loss.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path}: no such file (expected a SentencePiece .model file)")
        self.path = path
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"tokenizer {path}: not a valid SentencePiece model ({error})") from None
        self.bos_id: int = self.processor.bos_id()
        self.eos_id: int = self.processor.eos_id()
        self.pad_id: int = 0
        self.vocab_size: int = self.processor.vocab_size()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"tokenizer {path}: the model defines no BOS/EOS pieces (bos={self.bos_id}, eos={self.eos_id})")
        # SentencePiece prepends a dummy "▁" to every input, so "\n" alone encodes as ["▁", "<0x0A>"]
        # for Llama 2. Those leading ids are what `encode(..., prefix_space=False)` strips off.
        self._newline_ids: list[int] = self.processor.encode("\n")

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False, prefix_space: bool = True) -> list[int]:
        """Token ids of `text`, optionally framed by BOS/EOS.

        `prefix_space=False` encodes a continuation: the ids `text` gets when it follows other text that
        ends in a newline (e.g. a response after the Alpaca prompt), without the "▁" SentencePiece would
        otherwise put in front. It encodes "\\n" + text and drops the ids of "\\n" alone; this is exact
        because "\\n" is a byte-fallback piece that no merge crosses.
        """
        if prefix_space:
            ids = self.processor.encode(text)
        else:
            ids = self.processor.encode("\n" + text)
            prefix = self._newline_ids
            if ids[: len(prefix)] != prefix:  # would mean a model whose pieces merge across "\n"
                raise ValueError(f"tokenizer {self.path}: cannot encode a continuation, '\\n' merges with the text that follows it")
            ids = ids[len(prefix) :]
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; BOS, EOS and pad are dropped as SentencePiece control/unknown pieces."""
        return self.processor.decode([int(i) for i in ids if int(i) != self.pad_id])
