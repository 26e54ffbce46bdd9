"""`zoo eval runs`: run folders side by side (final and best values over seeds, curves PNG), and its errors."""

import json

import pytest

from eval.runs import compare_runs
from zoo.cli import main as zoo_main


def write_run(folder, model, seed, values, column="val_loss", model_args=None):
    folder.mkdir(parents=True)
    lines = [f"step,loss,{column}"] + [f"{10 * i},1.0,{v}" for i, v in enumerate(values)] + ["41,0.5,"]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    args = "".join(f"\n  {k}: {v}" for k, v in (model_args or {}).items())
    (folder / "config.yaml").write_text(f"model: {model}\nseed: {seed}\nmodel_args:{args or ' {}'}\n")


def test_models_are_summarised_over_their_seeds(tmp_path):
    write_run(tmp_path / "a0", "rwkv4-169m", 0, [5.0, 4.0, 4.5], model_args={"n_layer": 6})
    write_run(tmp_path / "a1", "rwkv4-169m", 1, [5.0, 3.0, 4.1], model_args={"n_layer": 6})
    write_run(tmp_path / "b0", "gpt-169m", 0, [5.0, 4.8, 4.6])
    summary = compare_runs([str(tmp_path / d) for d in ("a0", "a1", "b0")], "val_loss", str(tmp_path / "s.json"),
                           str(tmp_path / "s.png"))
    rwkv = summary["rwkv4-169m (n_layer=6)"]
    assert rwkv["final"]["mean"] == pytest.approx(4.3) and rwkv["final"]["std"] == pytest.approx(0.2828, abs=1e-4)
    assert rwkv["best"]["mean"] == pytest.approx(3.5) and rwkv["seeds"] == [0, 1] and rwkv["final_step"] == [20, 20]
    assert summary["gpt-169m"]["best"] == {"mean": 4.6, "std": 0.0}
    assert json.loads((tmp_path / "s.json").read_text())["runs"][0]["curve"] == [[0, 5.0], [10, 4.0], [20, 4.5]]
    assert (tmp_path / "s.png").stat().st_size > 0


def test_accuracies_take_the_highest_value_and_errors_are_named(tmp_path, capsys):
    write_run(tmp_path / "v", "vrwkv_tiny", 0, [70.0, 91.0, 90.5], column="val_top1")
    assert compare_runs([str(tmp_path / "v")], "val_top1")["vrwkv_tiny"]["best"]["mean"] == 91.0
    with pytest.raises(SystemExit, match="has no column 'val_loss'; it has step, loss, val_top1"):
        zoo_main(["eval", "runs", str(tmp_path / "v")])
    with pytest.raises(SystemExit, match="is not a run folder: it has no metrics.csv"):
        zoo_main(["eval", "runs", str(tmp_path)])
