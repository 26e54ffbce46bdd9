"""Training on several processes (torchrun, gloo on CPU): the same losses as one process at the same global
batch (DDP and FSDP2), and runs whose rank 0 dies of SIGKILL (mid-training, mid-checkpoint) that resume from
their last complete checkpoint and finish with the uninterrupted run's losses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from recipes.engine import FAULT_ENV, checkpoint_problem, latest_checkpoint
from test_engine import RECIPE, read_metrics, tiny_overrides, tiny_run, train_losses

STEPS = 20


def run_length(batch_size: int) -> tuple[str, ...]:
    """STEPS steps of `batch_size` sequences per process, validation every 10."""
    return f"max_steps={STEPS}", f"batch_size={batch_size}", "eval_every=10"


def torchrun(out_dir: Path, text_dir: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """`zoo train --nproc 2` (torchrun, two gloo processes of 4 sequences each) in its own process group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "zoo", "train", "--nproc", "2", RECIPE,
           *tiny_overrides(out_dir, text_dir, *run_length(4), *extra)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)


def assert_ran(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def assert_same_losses(got: dict[int, float], expected: dict[int, float], rel: float) -> None:
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=rel), f"step {step}: {got[step]} vs {loss}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, text_dir) -> dict[int, float]:
    out = tmp_path_factory.mktemp("one")
    tiny_run(out, text_dir, *run_length(8))
    return train_losses(out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, text_dir) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun(out, text_dir)
    assert_ran(result)
    assert "global batch: 4 sequences x 1 accumulation steps x 2 processes (ddp, cpu) = 8 sequences" in result.stdout
    return out


def test_ddp_on_two_processes_matches_one_process(two_processes, one_process):
    assert_same_losses(train_losses(two_processes), one_process, rel=1e-5)
    rows = [r for r in read_metrics(two_processes)[1] if r["loss"]]
    assert all(float(r["tokens_per_s"]) == pytest.approx(2 * float(r["tokens_per_s_per_process"])) for r in rows)
    model = zoo.load_checkpoint(two_processes / "model")           # rank 0 wrote the whole model
    assert (model.config.n_layer, model.config.n_embd) == (1, 32)


def test_fsdp2_on_two_processes_matches_one_process(tmp_path, text_dir, one_process):
    out = tmp_path / "fsdp"
    assert_ran(torchrun(out, text_dir, "strategy=fsdp", "grad_checkpointing=true"))
    assert_same_losses(train_losses(out), one_process, rel=1e-5)
    final = zoo.load_checkpoint(out / "model").state_dict()         # gathered from the shards
    checkpoint = zoo.load_checkpoint(out / "checkpoints" / f"step_{STEPS:07d}").state_dict()
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[k], checkpoint[k]) for k in final)


def test_fsdp2_with_compiled_blocks_matches_one_process(tmp_path, text_dir, one_process):
    """compile=default under FSDP2: each block compiled before it is sharded; the losses of one eager process."""
    assert_ran(torchrun(tmp_path / "fsdp", text_dir, "strategy=fsdp", "compile=default"))
    assert_same_losses(train_losses(tmp_path / "fsdp"), one_process, rel=1e-5)


@pytest.mark.parametrize("fault", ["kill_after_step:13", "kill_while_saving:15"])
def test_a_killed_run_resumes_from_its_last_complete_checkpoint(tmp_path, text_dir, two_processes, fault):
    """Rank 0 dies of SIGKILL after step 13, or while it writes the step-15 checkpoint (torchrun then stops the
    job); resume=auto goes on from step 10 and finishes with the uninterrupted run's losses."""
    out = tmp_path / "run"
    killed = torchrun(out, text_dir, "save_every=5", fault=fault)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    complete = [n for n in names if not n.startswith(".")]
    assert complete == ["step_0000005", "step_0000010"]            # nothing named step_15 was ever half there
    assert all(checkpoint_problem(out / "checkpoints" / n) is None for n in complete)
    assert latest_checkpoint(out) == out / "checkpoints" / "step_0000010"

    resumed = torchrun(out, text_dir, "save_every=5", "resume=auto")
    assert_ran(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr and "step 10" in resumed.stdout + resumed.stderr
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]   # the stale write is gone
    assert_same_losses(train_losses(out), train_losses(two_processes), rel=1e-6)


def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one(tmp_path, text_dir, caplog):
    out = tmp_path / "run"
    tiny_run(out, text_dir, "max_steps=4", "save_every=2")
    latest = out / "checkpoints" / "step_0000004"
    weights = latest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF                                                # one flipped byte in the last tensor
    weights.write_bytes(bytes(data))

    assert "model.safetensors" in checkpoint_problem(latest)
    assert latest_checkpoint(out) == out / "checkpoints" / "step_0000002"
    assert "skipping checkpoint" in caplog.text and "model.safetensors" in caplog.text
    with pytest.raises(FileNotFoundError, match="cannot resume from this checkpoint"):
        tiny_run(out, text_dir, "max_steps=6", f"resume={latest}")

