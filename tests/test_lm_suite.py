"""The local language-model suite (`zoo eval lm`): the last-word passages and their scores, the command's report,
and Jane Austen's novels as a text folder (`zoo data austen`)."""

import json
import random
import shutil
import zlib
from pathlib import Path

import pytest
import torch

import zoo
from eval.lm import LastWordItem, last_word_accuracy, last_word_items
from eval.scoring import LMScorer
from recipes.austen import split_chapters
from zoo.cli import main as zoo_main

JANEAUSTENR = Path("/usr/lib/R/site-library/janeaustenr")


def test_last_word_passages_follow_the_rule():
    text = ("Anna saw a small boat near the pier. Mr. Grey asked her about the boat. She looked at the pier again.\n"
            "He said the boat was near the pier. She said nothing. Then she went home, not to the boat.")
    # the context starts at the latest sentence start 8 or more words before the target, which it must contain;
    # "again", "nothing" and the last "boat" are not in theirs
    assert last_word_items([text], items=100, context_words=8) == [
        LastWordItem("Anna saw a small boat near the pier. Mr. Grey asked her about the", "boat"),
        LastWordItem("She looked at the pier again.\nHe said the boat was near the", "pier")]
    assert last_word_items(["The end. Mr. Smith met the dogs. Mr. Smith liked the dogs."], context_words=5) == [
        LastWordItem("Mr. Smith met the dogs. Mr. Smith liked the", "dogs")]          # "Mr." ends no sentence
    assert last_word_items(["She looked at the pier again. He said the boat was near the\npier."],
                           context_words=8) == []                                      # the target follows a space
    drawn = last_word_items([text] * 3, items=2, seed=3, context_words=8)
    assert len(drawn) == 2 and drawn == last_word_items([text] * 3, 2, 3, 8)


def test_last_word_scores_are_the_models_own(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("rwkv4-tiny", n_layer=1, n_embd=16)
    rng = random.Random(0)
    words = "the river stone light green town runs falls under over".split()
    text = " ".join(rng.choice(words) + ("." if rng.random() < 0.2 else "") for _ in range(400))
    items = last_word_items([text], items=6, context_words=20)
    scorer = LMScorer(model, batch_size=4)
    result = last_word_accuracy(scorer, items)
    expected = []
    for item in items:
        context, continuation = list(item.context.encode()), list((" " + item.target).encode())
        with torch.no_grad():
            logprobs = model(torch.tensor([context + continuation[:-1]]))[0, len(context) - 1:].log_softmax(-1)
        expected.append((logprobs[range(len(continuation)), continuation].sum().item(),
                         logprobs.argmax(-1).tolist() == continuation))
    assert result["items"] == 6
    assert result["mean_logprob"] == pytest.approx(sum(lp for lp, _ in expected) / 6, abs=1e-5)
    assert result["accuracy"] == sum(greedy for _, greedy in expected) / 6


def sentence_folder(folder: Path) -> Path:
    """Pseudo-English sentences in 40 files (with held-out ones at the default 5%)."""
    folder.mkdir(exist_ok=True)
    rng = random.Random(1)
    words = "the river stone light green town runs falls under over".split()
    for i in range(40):
        sentences = (" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))).capitalize() + "."
                     for _ in range(60))
        (folder / f"doc{i:02d}.txt").write_text(" ".join(sentences) + "\n")
    assert any(zlib.crc32(f"doc{i:02d}.txt".encode()) % 10000 < 500 for i in range(40))
    return folder


def test_zoo_eval_lm_reports_loss_bpb_perplexity_and_last_word(tmp_path, capsys):
    folder = sentence_folder(tmp_path)
    zoo_main(["eval", "lm", "rwkv4-tiny", "--data", str(folder), "--batches", "1", "--batch-size", "4",
              "--ctx-len", "32", "--last-word", "8", "--json", str(tmp_path / "lm.json")])
    out = capsys.readouterr().out
    assert "bits/byte, perplexity" in out and "last word: accuracy" in out and "on 8 held-out passages" in out
    result = json.loads((tmp_path / "lm.json").read_text())
    assert result["tokens"] == 4 * 32 and result["perplexity"] == pytest.approx(2.718281828 ** result["loss"])
    assert result["last_word"]["items"] == 8 and 0 <= result["last_word"]["accuracy"] <= 1


def test_zoo_eval_lm_on_token_shards_skips_the_last_word_task(tmp_path, capsys):
    folder = sentence_folder(tmp_path / "text")
    zoo_main(["data", "text", str(folder), "--out", str(tmp_path / "tokens")])
    capsys.readouterr()
    zoo_main(["eval", "lm", "rwkv4-tiny", "--data", str(tmp_path / "tokens"), "--batches", "1", "--batch-size", "2",
              "--ctx-len", "16"])
    assert "last word: skipped" in capsys.readouterr().out


def test_zoo_eval_lm_names_bad_input(tmp_path):
    for argv, message in [(["vrwkv_tiny"], "vrwkv_tiny is a vision model, not a language model"),
                          (["rwkv4-tin"], "closest: rwkv4-tiny"),
                          (["rwkv4-tiny", "--data", str(tmp_path / "missing")], "neither 'stdlib'")]:
        with pytest.raises(SystemExit) as exit_info:
            zoo_main(["eval", "lm", *argv])
        assert str(exit_info.value.code).startswith("zoo eval lm: ") and message in str(exit_info.value.code)


def test_chapters_are_split_at_headings_one_paragraph_per_line():
    lines = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "", "", "Emma Woodhouse, handsome,",
             "clever, and rich.", "", "She was the youngest.", "", "", "CHAPTER II", "", "Mr. Weston was a native",
             "of Highbury.", "", "VOLUME II", "", "Chapter 3", "Short."]
    assert split_chapters(lines) == ["Emma Woodhouse, handsome, clever, and rich.\nShe was the youngest.\n",
                                     "Mr. Weston was a native of Highbury.\n", "Short.\n"]


def test_zoo_data_austen_without_r_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        zoo_main(["data", "austen", "--out", str(tmp_path / "austen")])
    assert "apt-get install r-cran-janeaustenr" in str(exit_info.value.code)


@pytest.mark.skipif(shutil.which("Rscript") is None or not JANEAUSTENR.is_dir(),
                    reason="needs Debian's r-cran-janeaustenr")
def test_zoo_data_austen_writes_the_six_novels_as_chapters(tmp_path, capsys):
    zoo_main(["data", "austen", "--out", str(tmp_path)])
    info = json.loads((tmp_path / "info.json").read_text())
    assert json.loads(capsys.readouterr().out) == info
    assert info["chapters"] == 269 and len(info["novels"]) == 6 and 700_000 < info["words"] < 730_000
    first = (tmp_path / "prideprejudice" / "chapter-001.txt").read_text()
    assert first.startswith("It is a truth universally acknowledged, that a single man in possession of a good "
                            "fortune, must be in want of a wife.\n")
    assert len(list(tmp_path.rglob("*.txt"))) == 269
