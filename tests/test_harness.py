"""lm-evaluation-harness adapter (eval.harness over eval.scoring): log-likelihoods and greedy flags against a direct
computation with the model, state reuse for shared contexts, whole-document scores, greedy generation up to stop
strings, and `zoo eval lm-harness` on local YAML tasks over local JSONL, offline."""

import json
import math
import socket

import pytest
import torch

import zoo
from zoo.cli import main as zoo_main

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from eval.harness import ZooLM  # noqa: E402

LANGUAGE_MODELS = ["rwkv4-tiny", "rrwkv-tiny", "gpt-tiny"]


def zoo_lm(name: str, **kwargs) -> ZooLM:
    torch.manual_seed(0)
    return ZooLM(model=name, device="cpu", batch_size=3, **kwargs)


def requests(kind: str, *args_list) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


@torch.no_grad()
def direct(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """Log-softmax of one parallel forward over context + continuation, summed over the continuation in float64."""
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = model(ids[:, :-1])[0, len(context_ids) - 1:].double().log_softmax(-1)
    targets = ids[0, len(context_ids):]
    return logprobs.gather(-1, targets[:, None]).sum().item(), bool((logprobs.argmax(-1) == targets).all())


class TokenCounter:
    """Counts the tokens a model reads, and the forwards that start from a given state."""

    def __init__(self, model):
        self.tokens = self.from_state = 0
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.tokens += args[0].numel()
        self.from_state += kwargs.get("state") is not None


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_loglikelihood_matches_a_direct_computation(name):
    lm = zoo_lm(name)
    model, scorer = lm.scorer.model, lm.scorer
    story = "Once upon a time, in a quiet village by the sea, there lived an old fisherman named"
    pairs = [(story, " Tom"), (story, " Jonathan Smith"), ("Q: two plus two?\nA:", " four"), (story, " a cat."),
             ("", "Hello there"), ("ends with a space ", "word"), ("Q: two plus two?\nA:", " five")]
    counter = TokenCounter(model)
    results = lm.loglikelihood(requests("loglikelihood", *pairs))
    tokens_read, forwards_from_state = counter.tokens, counter.from_state
    for pair, (logprob, is_greedy) in zip(pairs, results):
        context_ids, continuation_ids = scorer.encode_pair(*pair)
        expected_logprob, expected_greedy = direct(model, context_ids, continuation_ids)
        assert logprob == pytest.approx(expected_logprob, abs=1e-5)
        assert is_greedy == expected_greedy
    assert scorer.encode_pair("", "Hello") == (list(b"\n\n"), list(b"Hello"))           # the document separator
    assert scorer.encode_pair("a space ", "word") == (list(b"a space"), list(b" word"))  # the space moves on
    if scorer.stateful:   # the story's state is read once for its three continuations, then copied into each row
        naive = sum(sum(map(len, scorer.encode_pair(*pair))) - 1 for pair in pairs)
        assert forwards_from_state >= 1 and tokens_read < naive - len(story)


@pytest.mark.parametrize("name", ["rwkv4-tiny", "gpt-tiny"])
def test_greedy_flag_is_true_exactly_for_the_argmax_continuation(name):
    from zoo.generate import generate

    scorer = zoo_lm(name).scorer
    context = scorer.tokenizer.encode("The weather today is")
    greedy = list(generate(scorer.model, context, 4, temperature=0))
    wrong = greedy[:3] + [(greedy[3] + 1) % 256]
    (_, first), (_, second), (_, third) = scorer.score_tokens([(context, greedy), (context, wrong),
                                                               (context[:3], greedy)])
    assert first and not second and not third


@pytest.mark.parametrize("name", ["rwkv4-tiny", "rrwkv-tiny"])
def test_rwkv_scores_whole_documents_with_the_state_carried_through(name):
    lm = zoo_lm(name, max_length=32)         # documents longer than a forward: the state crosses 10+ chunks
    documents = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, must "
                 "be in want of a wife. " * 3, "A short one."]
    results = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(doc,) for doc in documents]))
    for document, logprob in zip(documents, results):
        expected, _ = direct(lm.scorer.model, list(b"\n\n"), list(document.encode()))
        assert logprob == pytest.approx(expected, rel=1e-6)


def test_gpt_scores_long_documents_in_lm_eval_rolling_windows():
    window = 32
    lm = zoo_lm("gpt-tiny", max_length=window)
    document = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 2
    (logprob,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (document,)))
    expected = 0.0
    for inputs, predicted in map(make_disjoint_window, get_rolling_token_windows(list(document.encode()),
                                                                                  ord("\n"), window, 1)):
        expected += direct(lm.scorer.model, inputs, predicted)[0]
    assert logprob == pytest.approx(expected, abs=1e-4)
    lm = zoo_lm("gpt-tiny")                   # a document within one window: one forward
    (short,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", ("Short text.",)))
    assert short == pytest.approx(direct(lm.scorer.model, list(b"\n\n"), list(b"Short text."))[0], abs=1e-5)


@pytest.mark.parametrize("name", ["rwkv4-tiny", "gpt-tiny"])
def test_generate_until_stops_before_the_first_stop_string(name):
    lm = zoo_lm(name)
    (free,) = lm.generate_until(requests("generate_until", ("Once upon a time", {"until": [], "max_gen_toks": 24})))
    assert len(free) >= 8
    stop = free[6:8]
    (stopped,) = lm.generate_until(requests("generate_until", ("Once upon a time", {"until": [stop, "never"],
                                                                                     "max_gen_toks": 24})))
    assert stopped == free[:free.index(stop)] and len(stopped) <= 6
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until(requests("generate_until", ("Once", {"until": ["."], "do_sample": True})))


def write_tasks(folder, documents, cache):
    """A JSONL file of (context, target) documents and three YAML tasks over it, one per request type."""
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in documents))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\n  cache_dir: {cache}\n"
              "test_split: test\n")
    (folder / "lastword.yaml").write_text(
        "task: lastword_tiny\n" + common + "output_type: loglikelihood\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: \"{{' ' + target}}\"\nmetric_list:\n  - metric: acc\n  - metric: perplexity\n")
    (folder / "rolling.yaml").write_text(
        "task: rolling_tiny\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{context}} {{target}}'\nmetric_list:\n  - metric: bits_per_byte\n"
        "  - metric: word_perplexity\n")
    (folder / "generate.yaml").write_text(
        "task: generate_tiny\n" + common + "output_type: generate_until\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: \"{{' ' + target}}\"\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n")
    return data


def test_zoo_eval_lm_harness_runs_local_yaml_tasks_offline(tmp_path, monkeypatch):
    torch.manual_seed(0)
    zoo.save_checkpoint(zoo.create_model("rwkv4-tiny", n_layer=2, n_embd=32), tmp_path / "model")
    documents = [{"context": "The old man walked to the river, and there by the", "target": "river"},
                 {"context": "She opened the door and saw her sister. Her", "target": "sister"},
                 {"context": "One, two, three,", "target": "four"}]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks, documents, tmp_path / "cache")
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):   # what the command sets, restored after the test
        monkeypatch.setenv(variable, "1")
    connections = []
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: connections.append(address))
    zoo_main(["eval", "lm-harness", "--checkpoint", str(tmp_path / "model"), "--tasks", str(tasks / "lastword.yaml"),
              "rolling_tiny", "generate_tiny", "--include-path", str(tasks), "--device", "cpu",
              "--json", str(tmp_path / "results.json")])
    assert connections == []
    results = json.loads((tmp_path / "results.json").read_text())["results"]

    lm = ZooLM(checkpoint=str(tmp_path / "model"), device="cpu")
    scores = lm.scorer.loglikelihood([(doc["context"], " " + doc["target"]) for doc in documents])
    assert results["lastword_tiny"]["acc,none"] == sum(greedy for _, greedy in scores) / 3
    assert results["lastword_tiny"]["perplexity,none"] == pytest.approx(
        math.exp(-sum(logprob for logprob, _ in scores) / 3), rel=1e-5)
    texts = [f"{doc['context']} {doc['target']}" for doc in documents]
    total = sum(lm.scorer.loglikelihood_rolling(texts))
    assert results["rolling_tiny"]["bits_per_byte,none"] == pytest.approx(
        -total / math.log(2) / sum(len(text.encode()) for text in texts), rel=1e-5)
    assert 0 <= results["generate_tiny"]["exact_match,none"] <= 1


def test_lm_harness_names_bad_input(tmp_path, capsys, monkeypatch):
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks, [{"context": "a", "target": "b"}], tmp_path / "cache")
    (tasks / "items.jsonl").unlink()
    for argv, message in [
        (["--model", "rwkv4-tiny", "--tasks", "lastword_tin", "--include-path", str(tasks)],
         "unknown task 'lastword_tin'; closest: lastword_tiny"),
        (["--model", "rwkv4-tiny", "--tasks", str(tmp_path / "none.yaml")], "no task file"),
        (["--model", "rwkv4-tiny", "--tasks", str(tasks / "lastword.yaml")], "items.jsonl"),
        (["--model", "vrwkv_tiny", "--tasks", str(tasks / "lastword.yaml")], "vision model, not a language model"),
        (["--model", "rwkv4-tin", "--tasks", str(tasks / "lastword.yaml")], "closest: rwkv4-tiny"),
        (["--tasks", str(tasks / "lastword.yaml")], "give --model NAME or --checkpoint DIR"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            zoo_main(["eval", "lm-harness", "--device", "cpu", *argv])
        assert str(exit_info.value.code).startswith("zoo eval lm-harness: ") and message in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        zoo_main(["eval", "lm-harness", "--help"])
    assert exit_info.value.code == 0 and "rwkv-zoo" in capsys.readouterr().out
