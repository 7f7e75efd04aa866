"""Sweep parameters: the grid parsed from the command line, every point validated before a
run starts, the seeds, the table's statistics."""

from __future__ import annotations

import math
import statistics

import pytest
import typer

from flows.cli_args import parse_grid
from flows.sweep import SweepParams, add_gains, grid_points, mean_std, sweep_markdown
from tests.conftest import AG


def _params(**kw) -> SweepParams:
    return SweepParams(profile="sample", data=str(AG), **kw)


def test_grid_from_the_command_line():
    assert parse_grid(["classifier.lr=1e-3,2e-3", "classifier.dropout=0.3,0.5"]) == {
        "classifier.lr": [0.001, 0.002],
        "classifier.dropout": [0.3, 0.5],
    }
    # values holding commas: a JSON list
    assert parse_grid(["classifier.mlp_hidden=[[128, 64], [256]]"]) == {
        "classifier.mlp_hidden": [[128, 64], [256]]
    }
    for bad in (["classifier.lr"], ["lr=1,2"], ["classifier.lr=1", "classifier.lr=2"]):
        with pytest.raises(typer.BadParameter):
            parse_grid(bad)


def test_points_are_every_combination_in_order():
    assert grid_points({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]


def test_each_point_and_seed_is_a_validated_classifier_config():
    p = _params(grid={"classifier.lr": [1e-3, 2e-3], "classifier.mlp_hidden": [[64]]}, seeds=3)
    configs = [p.classifier_config(pt, k) for pt in p.points() for k in range(3)]
    assert [c.seed for c in configs] == [7, 8, 9, 7, 8, 9]  # the sample profile's seed + k
    assert {c.lr for c in configs} == {1e-3, 2e-3}
    assert all(c.mlp_hidden == (64,) for c in configs)
    assert all(c.dropout == 0.4 for c in configs)  # the rest is the profile's


@pytest.mark.parametrize(
    ("grid", "needle"),
    [
        ({"bilm.hidden_dim": [64]}, "a sweep varies classifier settings"),
        ({"classifier.nope": [1]}, "a sweep varies classifier settings"),
        ({"classifier.seed": [1, 2]}, "cannot be swept: use --seeds"),
        ({"layers.max_len": [32]}, "a sweep varies classifier settings"),
        ({"classifier.lr": []}, "has no values"),
        ({"classifier.lr": [1e-3, 1e-3]}, "repeats a value"),
        (
            {"classifier.lr": [1e-3, -1.0]},
            r"grid point \{'classifier.lr': -1.0\}: .*lr must be > 0",
        ),
        ({"classifier.dropout": ["high"]}, "grid point"),
    ],
)
def test_bad_grids_fail_before_a_run(grid, needle):
    with pytest.raises(ValueError, match=needle):
        _params(grid=grid)


def test_seeds_are_bounded():
    with pytest.raises(ValueError, match="seeds"):
        _params(grid={"classifier.lr": [1e-3]}, seeds=0)


def test_mean_and_sample_std():
    m, s = mean_std([0.90, 0.91, 0.92])
    assert m == pytest.approx(0.91) and s == pytest.approx(0.01)
    assert math.isnan(mean_std([0.9])[1])


def test_table_marks_the_best_validation_point():
    rows = [
        {"point_index": i, "point": {"classifier.lr": lr}, "strategy": "wsum",
         "test_accuracy_mean": t, "test_accuracy_std": 0.001, "val_accuracy_mean": v,
         "val_accuracy_std": 0.002, "test_accuracy": [t, t]}
        for i, (lr, t, v) in enumerate([(1e-3, 0.90, 0.91), (2e-3, 0.89, 0.93)])
    ]  # fmt: skip
    md = sweep_markdown(rows, ["classifier.lr"], [7, 8]).splitlines()
    assert md[0].startswith("| point | classifier.lr | strategy | test accuracy (mean ± std)")
    assert "**(best val)**" in md[3] and "0.8900 ± 0.0010" in md[3]
    assert "**(best val)**" not in md[2]


def _row(i, strategy, accs, seeds=(7, 8, 9)):
    m, s = mean_std(accs)
    return {
        "point_index": i, "point": {"classifier.lr": 1e-3 * (i + 1)}, "strategy": strategy,
        "seeds": list(seeds), "test_accuracy": accs, "test_accuracy_mean": m,
        "test_accuracy_std": s, "val_accuracy_mean": 0.9, "val_accuracy_std": 0.0,
    }  # fmt: skip


def test_the_ablation_is_trained_unless_turned_off():
    assert _params(grid={"classifier.lr": [1e-3]}, strategies=["sum", "wsum"]).trained() == [
        "sum",
        "wsum",
        "static",
    ]
    off = _params(grid={"classifier.lr": [1e-3]}, ablation=False)
    assert off.trained() == ["wsum"]  # a sweep's default strategy, as the CLI's


def test_gains_are_paired_by_seed_within_a_point():
    rows = [
        _row(0, "wsum", [0.91, 0.90, 0.93]),
        _row(0, "static", [0.90, 0.90, 0.90]),
        _row(1, "wsum", [0.80, 0.80, 0.80]),
        _row(1, "static", [0.81, 0.79, 0.80]),
    ]
    add_gains(rows)
    assert rows[0]["elmo_gain"] == pytest.approx([0.01, 0.0, 0.03])
    assert rows[0]["elmo_gain_mean"] == pytest.approx(0.04 / 3)
    assert rows[0]["elmo_gain_std"] == pytest.approx(statistics.stdev([0.01, 0.0, 0.03]))
    # point 1's wsum is paired with point 1's static, not point 0's
    assert rows[2]["elmo_gain"] == pytest.approx([-0.01, 0.01, 0.0])
    assert "elmo_gain" not in rows[1] and "elmo_gain" not in rows[3]
    md = sweep_markdown(rows, ["classifier.lr"], [7, 8, 9]).splitlines()
    assert "gain over static, pt (mean ± std)" in md[0]
    assert "| +1.33 ± 1.53 |" in md[2]  # points: 100 x the accuracy difference
    assert "| — |" in md[3]  # the ablation has no gain over itself
    assert "**(best val)**" not in md[3] and "**(best val)**" not in md[5]


def test_gains_need_the_same_seeds():
    rows = [
        _row(0, "wsum", [0.91, 0.90], seeds=(7, 8)),
        _row(0, "static", [0.9, 0.9], seeds=(8, 9)),
    ]
    with pytest.raises(ValueError, match=r"seeds differ: \[7, 8\] vs the ablation's \[8, 9\]"):
        add_gains(rows)


def test_without_the_ablation_the_table_has_no_gain_column():
    rows = [_row(0, "wsum", [0.91], seeds=(7,))]
    add_gains(rows)
    md = sweep_markdown(rows, ["classifier.lr"], [7]).splitlines()
    assert "gain over static" not in md[0]
    assert "| 0.9100 |" in md[2]  # one seed: no "± nan"


def test_run_parameters_name_a_bad_runner():
    from flows.params import RunParams

    with pytest.raises(ValueError, match="task_runner"):
        RunParams(data=str(AG), task_runner="processes")
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        RunParams(data=str(AG), dask_address="127.0.0.1:8786")
    assert RunParams(data=str(AG), dask_address="tcp://127.0.0.1:8786").runner() == (
        "dask",
        "tcp://127.0.0.1:8786",
    )
