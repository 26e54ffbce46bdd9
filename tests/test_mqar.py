"""Multi-query associative recall: the generated sequences, the accuracy, a model learning the task, the command."""

import json

import pytest
import torch

import zoo
from eval.mqar import IGNORE, MQARTask, mqar_batch, query_accuracy, train_mqar
from zoo.cli import main as zoo_main


def test_sequences_bind_each_queried_key_to_its_context_value():
    task = MQARTask(seq_len=40, pairs=5, vocab=32)
    inputs, targets = mqar_batch(task, 64, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (64, 40)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        keys, values = x[0:10:2], x[1:10:2]
        assert len(set(keys)) == 5 and all(1 <= k < 16 for k in keys) and all(16 <= v < 32 for v in values)
        bound = dict(zip(keys, values))
        queries = [t for t in range(40) if y[t] != IGNORE]
        assert len(queries) == 5 and min(queries) >= 10
        assert sorted(x[t] for t in queries) == sorted(keys)                 # every key asked once
        for t in queries:
            assert y[t] == bound[x[t]] == x[t + 1]                           # the answer is the bound value
        filler = set(range(10, 40)) - {t for q in queries for t in (q, q + 1)}
        assert all(x[t] == 0 for t in filler)
    again = mqar_batch(task, 64, torch.Generator().manual_seed(0))[0]
    assert torch.equal(inputs, again) and not torch.equal(inputs, mqar_batch(task, 64, torch.Generator())[0])


def test_bad_task_parameters_are_named():
    with pytest.raises(ValueError, match="cannot hold 5 pairs"):
        MQARTask(seq_len=16, pairs=5, vocab=64)
    with pytest.raises(ValueError, match="distinct keys need vocab >= 22"):
        MQARTask(seq_len=64, pairs=10, vocab=16)


class Oracle(torch.nn.Module):
    """Predicts, at every position, the value bound to the current token earlier in the sequence."""

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 16)
        for b, row in enumerate(idx.tolist()):
            for t, token in enumerate(row):
                bound = [row[i + 1] for i in range(0, t - 1) if row[i] == token and token != 0]
                logits[b, t, bound[0] if bound else 0] = 1
        return logits


def test_accuracy_counts_only_queries():
    task = MQARTask(seq_len=16, pairs=2, vocab=16)
    assert query_accuracy(Oracle(), task, 2, 8, torch.Generator().manual_seed(1), torch.device("cpu")) == 1.0
    blank = Oracle()
    blank.forward = lambda idx: torch.zeros(*idx.shape, 16)                  # always predicts the filler, 0
    assert query_accuracy(blank, task, 2, 8, torch.Generator().manual_seed(1), torch.device("cpu")) == 0.0


def test_attention_learns_the_task_and_the_command_reports_it(tmp_path):
    task = MQARTask(seq_len=16, pairs=2, vocab=16)
    torch.manual_seed(0)
    model = zoo.create_model("gpt-tiny", vocab_size=16, ctx_len=16, n_layer=2, n_embd=32, n_head=2)
    result = train_mqar(model, task, steps=300, batch_size=32, lr=3e-3)
    assert result["accuracy"] > 0.3                                           # chance: 1 / 8

    out = tmp_path / "mqar.json"
    zoo_main(["eval", "mqar", "--model", "rwkv4-tiny", "--model-arg", "n_layer=1", "--model-arg", "n_embd=16",
              "--seq-len", "16", "--pairs", "2", "--vocab", "16", "--steps", "2", "--batch-size", "4",
              "--device", "cpu", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["steps"] == 2 and report["pairs"] == 2 and 0 <= report["accuracy"] <= 1 and report["params"] > 0
    with pytest.raises(SystemExit, match="did you mean n_layer"):
        zoo_main(["eval", "mqar", "--model", "gpt-tiny", "--model-arg", "nlayer=2", "--seq-len", "16", "--pairs", "2",
                  "--vocab", "16", "--steps", "1"])
    with pytest.raises(SystemExit, match="vrwkv_tiny is not a language model"):
        zoo_main(["eval", "mqar", "--model", "vrwkv_tiny", "--seq-len", "16", "--pairs", "2", "--vocab", "16"])


def test_bench_trains_every_model_task_lr_and_seed_and_writes_table_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    zoo_main(["bench", "mqar", "--models", "rwkv4-tiny", "rrwkv-tiny", "gpt-tiny", "--tasks", "16:2,24:3",
              "--vocab", "16", "--seeds", "0", "1", "--steps", "2", "--eval-every", "1", "--lrs", "1e-3", "1e-2",
              "--batch-size", "4", "--model-arg", "n_layer=1", "--model-arg", "n_embd=16", "--device", "cpu",
              "--json", str(out), "--plot", str(plot)])
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 3 * 2 * 2 * 2 and report["steps"] == 2
    assert all([c["step"] for c in r["curve"]] == [1, 2] and r["curve"][-1]["accuracy"] == r["accuracy"]
               for r in report["runs"])
    assert {(r["model"], r["seq_len"], r["lr"], r["seed"]) for r in report["runs"]} == {
        (m, t, lr, s) for m in ("rwkv4-tiny", "rrwkv-tiny", "gpt-tiny") for t in (16, 24) for lr in (1e-3, 1e-2)
        for s in (0, 1)}
    summary = report["summary"]
    assert len(summary) == 6 and all(len(e["accuracies"]) == 2 for e in summary)
    for e in summary:    # the reported accuracy is the best learning rate's mean over the seeds
        runs = [r for r in report["runs"] if r["model"] == e["model"] and r["seq_len"] == e["seq_len"]]
        means = {lr: sum(r["accuracy"] for r in runs if r["lr"] == lr) / 2 for lr in (1e-3, 1e-2)}
        assert e["mean_accuracy"] == pytest.approx(max(means.values())) and means[e["best_lr"]] == max(means.values())
    first = [e for e in summary if e["model"] == "rwkv4-tiny"]
    assert all(e["train_step_vs_rwkv4-tiny"] == e["inference_vs_rwkv4-tiny"] == 1.0 for e in first)
    assert all(e["train_step_tokens_per_s"] > 0 and e["inference_tokens_per_s"] > 0 for e in summary)
    params = {e["model"]: e["params"] for e in summary if e["seq_len"] == 16}
    assert abs(params["rrwkv-tiny"] / params["rwkv4-tiny"] - 1) < 0.05     # equal size after the width override
    assert plot.stat().st_size > 10_000 and "x rwkv4-tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="task '256': give SEQ_LEN:PAIRS"):
        zoo_main(["bench", "mqar", "--tasks", "256", "--device", "cpu"])
    with pytest.raises(SystemExit, match="unknown model 'rwkv-tiny'; closest"):
        zoo_main(["bench", "mqar", "--models", "rwkv-tiny", "--tasks", "16:2", "--vocab", "16", "--device", "cpu"])
