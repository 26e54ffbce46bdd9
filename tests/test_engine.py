"""The LM training engine: recipes and overrides, optimizer groups, schedule, L2Wrap, accumulation,
logs, checkpoints, resume, non-finite losses and a short demo run (all on CPU, tiny models)."""

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo
from recipes.config import OptimConfig, RecipeError, load_recipe
from recipes.data import TokenData
from recipes.engine import (NonFiniteLossError, l2wrap_penalty, latest_checkpoint, lr_lambda, param_groups,
                            train)
from zoo.checkpoint import read_state_dict
from zoo.cli import main as zoo_main

RECIPE = "lm/rwkv4-tiny-stdlib"
STATE_FILES = {"model.safetensors", "config.json", "trainer_state.pt", "optimizer", "checksums.json"}


def tiny_overrides(out_dir: Path, text_dir: Path, *extra: str) -> list[str]:
    """A 1-layer, 32-wide byte model on tiny batches: a step takes milliseconds on one CPU thread."""
    return [f"out_dir={out_dir}", f"data.source={text_dir}", "data.val_percent=30", "model_args.n_layer=1",
            "model_args.n_embd=32", "ctx_len=32", "batch_size=4", "eval_batches=1", "eval_every=100",
            "save_every=100", "threads=1", *extra]


def tiny_run(out_dir: Path, text_dir: Path, *extra: str) -> dict:
    return train(load_recipe(RECIPE, tiny_overrides(out_dir, text_dir, *extra)))


def saved_optimizer(checkpoint: Path, scratch: Path) -> dict:
    """The optimizer state a step checkpoint holds (torch.distributed.checkpoint files), as one plain dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "optimizer", scratch / "optimizer.pt")
    return torch.load(scratch / "optimizer.pt", weights_only=True)["optimizer"]


def read_metrics(out_dir: Path) -> tuple[list[str], list[dict]]:
    with open(out_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def train_losses(out_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.csv, refusing duplicated steps."""
    rows = [r for r in read_metrics(out_dir)[1] if r["loss"]]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics.csv: {steps}"
    return {int(r["step"]): float(r["loss"]) for r in rows}


def checkpoint_names(out_dir: Path) -> list[str]:
    """Every entry of the checkpoint directory, hidden temporaries included."""
    return sorted(p.name for p in (out_dir / "checkpoints").iterdir())


def patch_training_logits(monkeypatch, effect) -> None:
    """Models the engine builds pass their n-th training-mode logits (n = 1, 2, ...) through effect(n, logits)."""
    create_model = zoo.create_model
    calls = 0

    def hook(module, inputs, output):
        nonlocal calls
        if not module.training:
            return None
        calls += 1
        return effect(calls, output)

    def create_patched(*args, **kwargs):
        model = create_model(*args, **kwargs)
        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(zoo, "create_model", create_patched)


def nan_from(call: int):
    return lambda n, logits: logits * float("nan") if n >= call else logits


def dropout(n, logits):
    """Randomness drawn from torch's global generator, as dropout layers draw it."""
    return F.dropout(logits, p=0.1, training=True)


class SimulatedCrash(RuntimeError):
    """Stands for a killed process."""


def dropout_then_crash_at(call: int):
    def effect(n, logits):
        if n == call:
            raise SimulatedCrash(f"killed in training forward {n}")
        return dropout(n, logits)

    return effect


# --- recipes and the CLI -----------------------------------------------------------------------


def test_recipe_yaml_and_top_level_overrides_reach_the_config(tmp_path):
    cfg = load_recipe(RECIPE, ["max_steps=7", f"out_dir={tmp_path}", "seed=5", f"resume={tmp_path / 'old'}",
                               "optim.lr=1e-3", "model_args.n_layer=2"])
    assert (cfg.max_steps, cfg.out_dir, cfg.seed, cfg.resume) == (7, str(tmp_path), 5, str(tmp_path / "old"))
    assert cfg.optim.lr == 1e-3 and cfg.model_args == {"n_layer": 2}
    assert cfg.optim.warmup_steps == 20 and cfg.ctx_len == 128     # from the YAML file, not the schema defaults
    assert isinstance(cfg.optim, OptimConfig)


@pytest.mark.parametrize("override, key", [("no_such_key=1", "no_such_key"), ("optim.nope=1", "nope"),
                                           ("max_steps=ten", "max_steps"), ("seed=1.5", "seed"),
                                           ("optim.layerwise_lr=maybe", "layerwise_lr")])
def test_recipe_rejects_unknown_keys_and_wrong_types(override, key):
    with pytest.raises(RecipeError, match=key):
        load_recipe(RECIPE, [override])


def test_recipe_file_with_an_unknown_key_is_rejected(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: rwkv4-tiny\noptim:\n  learning_rate: 1.0e-3\n")
    with pytest.raises(RecipeError, match="learning_rate"):
        load_recipe(str(recipe))


def test_cli_train_reports_a_bad_override_without_a_traceback():
    with pytest.raises(SystemExit) as exit_info:
        zoo_main(["train", RECIPE, "max_steps=ten"])
    message = str(exit_info.value.code)
    assert message.startswith("zoo train:") and "max_steps" in message


@pytest.mark.parametrize("args, needle", [
    (["no/such/recipe"], "no recipe 'no/such/recipe'"),
    ([RECIPE, "model_args.n_layr=1"], "n_layr (did you mean n_layer?)"),
    ([RECIPE, "model=rwkv4-170m"], "unknown model 'rwkv4-170m'"),
    ([RECIPE, "precision=fp16"], "precision must be one of auto, bf16, fp32"),
    ([RECIPE, "batch_size=0"], "batch_size must be >= 1"),
])
def test_cli_train_names_recipe_mistakes_without_a_traceback(args, needle):
    with pytest.raises(SystemExit) as exit_info:
        zoo_main(["train", *args])
    message = str(exit_info.value.code)
    assert message.startswith("zoo train:") and needle in message


def test_malformed_yaml_is_a_recipe_error(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model: [rwkv4-tiny\n")
    with pytest.raises(RecipeError, match="broken.yaml"):
        load_recipe(str(recipe))


def test_cli_train_names_a_bad_data_source(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        zoo_main(["train", RECIPE, f"out_dir={tmp_path}", f"data.source={tmp_path / 'absent'}"])
    assert str(exit_info.value.code).startswith("zoo train: data.source=")


def test_cli_train_runs_a_recipe_with_overrides(tmp_path, text_dir, capsys):
    out = tmp_path / "run"
    zoo_main(["train", RECIPE, *tiny_overrides(out, text_dir, "max_steps=3", "seed=3")])
    stdout = capsys.readouterr().out
    assert "validation bits/byte" in stdout and str(out / "model") in stdout
    saved = load_recipe(str(out / "config.yaml"))
    assert (saved.max_steps, saved.seed, saved.out_dir) == (3, 3, str(out))
    assert sorted(train_losses(out)) == [1, 2, 3]


# --- optimizer, schedule, L2Wrap, accumulation ---------------------------------------------------


def test_param_groups_follow_the_official_rwkv_recipe():
    model = zoo.create_model("rwkv4-tiny", n_layer=2, n_embd=32)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, layerwise_lr=True)
    groups = param_groups(model, cfg)
    group_of = {id(p): g for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(group_of) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        g = group_of[id(p)]
        if name.endswith("time_decay"):
            expected = (2e-3, 0.0)
        elif name.endswith("time_first"):
            expected = (3e-3, 0.0)
        elif p.squeeze().dim() < 2:           # norms, biases, time_mix: no decay
            expected = (1e-3, 0.0)
        else:                                 # matrices, embedding and head included
            expected = (1e-3, 0.1)
        assert (g["lr"], g["weight_decay"]) == pytest.approx(expected), name
    torch.optim.AdamW(groups)                 # the groups are valid AdamW groups


def test_param_groups_without_layerwise_lr_use_one_lr():
    model = zoo.create_model("rwkv4-tiny", n_layer=2, n_embd=32)
    groups = param_groups(model, OptimConfig(lr=1e-3, weight_decay=0.1, layerwise_lr=False))
    assert {g["lr"] for g in groups} == {1e-3}
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.squeeze().dim() >= 2 and "time_" not in name), name


def test_lr_lambda_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    factor = lr_lambda(cfg, max_steps=110)
    warmup = [factor(s) for s in range(10)]
    assert warmup == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert warmup[-1] == pytest.approx(1.0) and factor(10) == pytest.approx(1.0)
    decay = [factor(s) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert factor(110) == pytest.approx(cfg.min_lr / cfg.lr)
    floor = cfg.min_lr / cfg.lr
    assert factor(60) == pytest.approx(floor + (1 - floor) / 2)        # half way down the cosine
    assert factor(35) == pytest.approx(floor + (1 - floor) * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_lambda(OptimConfig(warmup_steps=0), 10)(0) == pytest.approx(1.0)


class OfficialL2Wrap(torch.autograd.Function):
    """RWKV-LM's L2Wrap, written from its definition: forward passes the loss through; backward adds
    1e-4 / (B*T) * max_logit at each position's argmax to the logits' gradient."""

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (logits,) = ctx.saved_tensors
        batch, time = logits.shape[:2]
        top, where = logits.max(dim=-1, keepdim=True)
        grad_logits = torch.zeros_like(logits).scatter_(-1, where, top * 1e-4 / (batch * time))
        return grad_loss, grad_logits


def test_l2wrap_penalty_is_zero_and_matches_the_official_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = (5 * torch.randn(3, 7, 50, generator=gen, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 50, (3, 7), generator=gen)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    penalty = l2wrap_penalty(logits)
    assert penalty.item() == 0.0
    (ours,) = torch.autograd.grad(loss + penalty, logits, retain_graph=True)
    (official,) = torch.autograd.grad(OfficialL2Wrap.apply(loss, logits), logits)
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-12)
    (plain,) = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), targets.flatten()), logits)
    assert not torch.allclose(ours, plain, rtol=0, atol=1e-9)          # the penalty does change the gradient


def test_grad_accum_sums_micro_batches_like_one_large_batch(tmp_path, text_dir, monkeypatch):
    """grad_accum=2 x batch 4 gives the gradient, loss and update of grad_accum=1 x batch 8 on the same windows."""
    sample = TokenData.sample
    recorded: list[list[torch.Tensor]] = []
    clip = torch.nn.utils.clip_grads_with_norm_

    def record_then_clip(params, *args, **kwargs):
        params = list(params)
        recorded.append([p.grad.clone() for p in params])
        return clip(params, *args, **kwargs)

    def run(name, batch_size, grad_accum):
        micro = 0

        def fixed_train_windows(self, split, size, ctx_len, generator):
            nonlocal micro
            if split != "train":
                return sample(self, split, size, ctx_len, generator)
            x, y = sample(self, "train", 8, ctx_len, torch.Generator().manual_seed(7))
            part = slice(0, 8) if size == 8 else slice(4 * (micro % 2), 4 * (micro % 2) + 4)
            micro += 1
            return x[part], y[part]

        monkeypatch.setattr(TokenData, "sample", fixed_train_windows)
        tiny_run(tmp_path / name, text_dir, "max_steps=1", f"batch_size={batch_size}", f"grad_accum={grad_accum}")
        return train_losses(tmp_path / name)[1], zoo.load_checkpoint(tmp_path / name / "model").state_dict()

    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", record_then_clip)
    loss_accum, weights_accum = run("accum", batch_size=4, grad_accum=2)
    loss_large, weights_large = run("large", batch_size=8, grad_accum=1)

    assert len(recorded) == 2
    for g_accum, g_large in zip(*recorded):
        torch.testing.assert_close(g_accum, g_large, rtol=1e-5, atol=1e-8)
    assert loss_accum == pytest.approx(loss_large, rel=1e-6)
    for key in weights_large:
        torch.testing.assert_close(weights_accum[key], weights_large[key], rtol=1e-5, atol=1e-7)


def test_compiled_run_trains_like_the_eager_one(tmp_path, text_dir):
    """compile=default: the same losses and weights as eager (CPU, inductor), saved under the same names."""
    from torch._dynamo.utils import counters

    for name, extra in (("eager", ()), ("compiled", ("compile=default",))):
        counters.clear()
        tiny_run(tmp_path / name, text_dir, "max_steps=2", *extra)
        assert bool(counters["stats"]["unique_graphs"]) == bool(extra)   # dynamo compiled the model, or nothing
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-4)
    eager, compiled = (zoo.load_checkpoint(tmp_path / name / "model").state_dict() for name in ("eager", "compiled"))
    assert compiled.keys() == eager.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-6)


def test_an_unknown_compile_mode_is_a_recipe_error():
    with pytest.raises(RecipeError, match="compile must be one of default, reduce-overhead"):
        load_recipe(RECIPE, ["compile=fast"])


# --- logs, checkpoints, resume, failures ----------------------------------------------------------


def test_run_writes_progress_csv_tensorboard_plot_recipe_and_model(tmp_path, text_dir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = load_recipe(RECIPE, tiny_overrides(out, text_dir, "max_steps=4", "eval_every=2", "optim.warmup_steps=2"))
    train(cfg)

    assert "4/4" in capsys.readouterr().err                         # the tqdm bar reached the end
    fields, rows = read_metrics(out)
    assert fields == ["step", "loss", "lr", "tokens_per_s", "tokens_per_s_per_process", "step_ms", "peak_mem_gb",
                      "skipped_samples", "val_loss", "val_bpb"]
    train_rows = [r for r in rows if r["loss"]]
    val_rows = [r for r in rows if r["val_loss"]]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3, 4]
    assert [int(r["step"]) for r in val_rows] == [0, 2, 4]
    factor = lr_lambda(cfg.optim, cfg.max_steps)
    for r in train_rows:
        assert float(r["lr"]) == pytest.approx(cfg.optim.lr * factor(int(r["step"]) - 1))
        assert math.isfinite(float(r["loss"])) and float(r["tokens_per_s"]) > 0 and float(r["step_ms"]) > 0
        assert float(r["tokens_per_s_per_process"]) == pytest.approx(float(r["tokens_per_s"]))  # one process
        assert r["peak_mem_gb"] == ""                                                          # CPU: none
    for r in val_rows:
        assert float(r["val_bpb"]) == pytest.approx(float(r["val_loss"]) / math.log(2))

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val_bpb")] == [0, 2, 4]

    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_recipe(str(out / "config.yaml")) == cfg
    model = zoo.load_checkpoint(out / "model")
    assert (model.config.n_layer, model.config.n_embd) == (1, 32)
    final_checkpoint, _ = read_state_dict(out / "checkpoints" / "step_0000004")
    for key, value in model.state_dict().items():
        assert torch.equal(value, final_checkpoint[key]), key


def test_checkpoints_hold_trainer_state_and_only_the_last_n_are_kept(tmp_path, text_dir):
    out = tmp_path / "run"
    result = tiny_run(out, text_dir, "max_steps=6", "save_every=1", "keep_last=2")

    assert checkpoint_names(out) == ["step_0000005", "step_0000006"]
    latest = latest_checkpoint(out)
    assert latest == out / "checkpoints" / "step_0000006" and result["checkpoint"] == str(latest)
    assert {p.name for p in latest.iterdir()} == STATE_FILES
    state = torch.load(latest / "trainer_state.pt", weights_only=True)
    assert state["step"] == 6 and state["scheduler"]["last_epoch"] == 6 and state["world_size"] == 1
    assert state["rng"].dtype == torch.uint8
    model = zoo.load_checkpoint(latest)
    optimizer = saved_optimizer(latest, tmp_path)
    assert set(optimizer["state"]) == {name for name, _ in model.named_parameters()}
    lr = {g["name"]: g["lr"] for g in optimizer["param_groups"]}
    assert lr["time_decay"] == pytest.approx(2 * lr["no_decay"])
    assert lr["time_first"] == pytest.approx(3 * lr["no_decay"])


def test_a_failed_checkpoint_write_leaves_no_partial_directory(tmp_path, text_dir, monkeypatch):
    """The second trainer-state write dies half way: its step directory must never appear."""
    out = tmp_path / "run"
    save = torch.save
    writes = 0

    def save_then_fail_second(obj, f, *args, **kwargs):
        nonlocal writes
        writes += str(f).endswith("trainer_state.pt")
        if writes == 2:
            Path(f).write_bytes(b"half a file")
            raise OSError("disk full")
        save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail_second)
    with pytest.raises(OSError, match="disk full"):
        tiny_run(out, text_dir, "max_steps=6", "save_every=2")
    assert checkpoint_names(out) == ["step_0000002"]
    assert latest_checkpoint(out) == out / "checkpoints" / "step_0000002"
    assert torch.load(out / "checkpoints" / "step_0000002" / "trainer_state.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("resume", ["run_dir", "auto"])
def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path, text_dir, monkeypatch, resume):
    """A run killed during step 7 (last checkpoint: step 4) and resumed logs exactly the losses of an
    uninterrupted run; dropout-like noise on the logits makes the restored torch RNG state matter too."""
    def run(out_dir, effect, *extra) -> int:
        """Train; returns how many training forwards ran."""
        calls = []

        def counted(n, logits):
            calls.append(n)
            return effect(n, logits)

        with monkeypatch.context() as patch:
            patch_training_logits(patch, counted)
            tiny_run(out_dir, text_dir, "max_steps=8", "save_every=4", *extra)
        return len(calls)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(whole, dropout)
    with pytest.raises(SimulatedCrash):
        run(resumed, dropout_then_crash_at(7))
    assert latest_checkpoint(resumed).name == "step_0000004"
    assert sorted(train_losses(resumed)) == [1, 2, 3, 4, 5, 6]     # steps 5 and 6 get redone
    assert run(resumed, dropout, f"resume={resumed if resume == 'run_dir' else 'auto'}") == 4   # steps 5 to 8

    expected, got = train_losses(whole), train_losses(resumed)
    assert sorted(got) == list(range(1, 9))
    assert got == expected                    # bit for bit: same batches, optimizer, schedule and RNG state
    final_whole = zoo.load_checkpoint(whole / "model").state_dict()
    final_resumed = zoo.load_checkpoint(resumed / "model").state_dict()
    for key, value in final_whole.items():
        assert torch.equal(final_resumed[key], value), key


def test_resume_applies_changed_optimizer_settings(tmp_path, text_dir):
    """Overrides given with resume= govern the rest of the run: lr, schedule length and weight decay."""
    out = tmp_path / "run"
    tiny_run(out, text_dir, "max_steps=4", "save_every=4", "optim.warmup_steps=0")
    tiny_run(out, text_dir, "max_steps=8", "resume=auto", "optim.warmup_steps=0", "optim.lr=1e-3",
             "optim.min_lr=1e-4", "optim.weight_decay=0.1")
    rows = {int(r["step"]): float(r["lr"]) for r in read_metrics(out)[1] if r["lr"]}
    factor = lr_lambda(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0), 8)
    for step in range(5, 9):
        assert rows[step] == pytest.approx(1e-3 * factor(step - 1), rel=1e-12)
    groups = {g["name"]: g for g in saved_optimizer(out / "checkpoints" / "step_0000008", tmp_path)["param_groups"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["time_decay"]["initial_lr"] == pytest.approx(2e-3)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, text_dir, monkeypatch):
    out = tmp_path / "run"
    patch_training_logits(monkeypatch, nan_from(7))
    with pytest.raises(NonFiniteLossError) as error:
        tiny_run(out, text_dir, "max_steps=10", "save_every=3")

    last_good = out / "checkpoints" / "step_0000006"
    assert "step 7" in str(error.value) and str(last_good) in str(error.value)
    assert checkpoint_names(out) == ["step_0000003", "step_0000006"]
    assert torch.load(last_good / "trainer_state.pt", weights_only=True)["step"] == 6
    weights, _ = read_state_dict(last_good)
    assert all(torch.isfinite(w).all() for w in weights.values())
    zoo.load_checkpoint(last_good)
    assert sorted(train_losses(out)) == [1, 2, 3, 4, 5, 6]


def test_cli_train_reports_a_nonfinite_loss(tmp_path, text_dir, monkeypatch):
    patch_training_logits(monkeypatch, nan_from(1))
    with pytest.raises(SystemExit) as exit_info:
        zoo_main(["train", RECIPE, *tiny_overrides(tmp_path / "run", text_dir, "max_steps=3")])
    message = str(exit_info.value.code)
    assert message.startswith("zoo train:") and "step 1" in message and "none written yet" in message


# --- the demo -------------------------------------------------------------------------------------


def test_demo_recipe_lowers_validation_bits_per_byte(tmp_path):
    """30 steps of byte-level rwkv4-tiny on the standard library's sources: bpb falls far below ~8."""
    cfg = load_recipe(RECIPE, [f"out_dir={tmp_path / 'demo'}", "max_steps=30", "ctx_len=64", "batch_size=8",
                               "eval_batches=4", "eval_every=100", "save_every=100", "threads=1"])
    result = train(cfg)
    first, final = result["first_val"]["bpb"], result["final_val"]["bpb"]
    assert first > 7.5
    assert final < first - 3
