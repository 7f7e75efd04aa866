"""The ``elmo-news-sweep`` flow: the classifier stage fanned out over a grid of its settings and
several seeds, on one cached biLM and one set of stored layers.

One MLflow child run per point (params = the point; metrics = mean and sample std over the
seeds, and each seed's figure at step = seed), the seeds' classifier runs nested under it. The
run-to-run spread that single runs only hint at becomes a measured figure per point. Like a
run, every point also trains the static-word-vector ablation with each seed (``ablation``), so
each strategy's gain over it (paired by seed) comes with its own spread.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import Field, ValidationError, model_validator

from elmo_core.classifier_config import ClassifierConfig
from elmo_core.mix import ABLATION
from flows.fanout import fanout
from flows.params import RunParams, Strategy, resolve_sections
from flows.pipeline import THREADS, log_upstream, upstream
from flows.skeleton import parent_run
from storage.paths import read_json
from storage.tracking import Tracker
from tasks.classify import CLASSIFIER, classify
from tasks.stage import StageContext, in_home

# a sweep varies the classifier on fixed layers; the seed has --seeds
FIXED = {"seed"}


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the grid's key and value order."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


class SweepParams(RunParams):
    """A run's parameters plus the grid (``classifier.<field>`` -> values) and the seeds."""

    strategies: list[Strategy] = Field(default_factory=lambda: list[Strategy](["wsum"]))
    grid: dict[str, list[Any]] = Field(min_length=1)
    seeds: int = Field(3, ge=1, le=100)
    # every point and seed also trains the static ablation: each strategy's gain over it
    ablation: bool = True

    @model_validator(mode="after")
    def _check_grid(self) -> SweepParams:
        names = {f.name for f in fields(ClassifierConfig)}
        for key, values in self.grid.items():
            section, _, name = key.partition(".")
            if section != "classifier" or name not in names:
                raise ValueError(
                    f"grid key {key!r}: a sweep varies classifier settings "
                    f"(classifier.<field>, one of {sorted(names - FIXED)})"
                )
            if name in FIXED:
                raise ValueError(f"grid key {key!r} cannot be swept: use --seeds")
            if not values:
                raise ValueError(f"grid key {key!r} has no values")
            if len(set(map(repr, values))) != len(values):
                raise ValueError(f"grid key {key!r} repeats a value: {values}")
        for point in self.points():  # every point is a valid classifier config, before any run
            self.classifier_config(point, 0)
        return self

    def points(self) -> list[dict[str, Any]]:
        return grid_points(self.grid)

    def trained(self) -> list[str]:
        """The strategies each point trains: the chosen ones, then the ablation (if on)."""
        return [*self.strategies, *([ABLATION] if self.ablation else [])]

    def classifier_config(self, point: dict[str, Any], seed_index: int) -> ClassifierConfig:
        """The classifier settings of one point and seed: the run's (profile + overrides) with
        the point's values, validated as a run's are; seed = the run's seed + seed_index."""
        base = self.resolve().classifier
        values = {k.partition(".")[2]: v for k, v in point.items()}
        over = {**self.overrides.get("classifier", {}), **values, "seed": base.seed + seed_index}
        try:
            return resolve_sections(
                self.profile, {**self.overrides, "classifier": over}, self.device
            ).classifier
        except ValidationError as e:  # one line: what the point's value broke
            why = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
            raise ValueError(f"grid point {point}: {why}") from None
        except ValueError as e:
            raise ValueError(f"grid point {point}: {e}") from None


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; nan for one value)."""
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan


def add_gains(rows: list[dict[str, Any]]) -> None:
    """Give each strategy's row its gain over the same point's ablation row, paired by seed
    (``elmo_gain``: one per seed, ``elmo_gain_mean`` / ``_std``; accuracy units, as a run's
    ``elmo_gain_<strategy>``): the seed moves both fits, so the paired difference is the
    figure whose spread tells whether a gain is real."""
    static = {r["point_index"]: r for r in rows if r["strategy"] == ABLATION}
    for r in rows:
        base = static.get(r["point_index"])
        if base is None or r is base:
            continue
        if r["seeds"] != base["seeds"]:
            raise ValueError(f"seeds differ: {r['seeds']} vs the ablation's {base['seeds']}")
        gains = [a - b for a, b in zip(r["test_accuracy"], base["test_accuracy"], strict=True)]
        r["elmo_gain"] = gains
        r["elmo_gain_mean"], r["elmo_gain_std"] = mean_std(gains)


def _pm(mean: float, std: float, fmt: str, scale: float = 1.0) -> str:
    """``mean ± std`` (the std left out where one seed gives none)."""
    m, s = mean * scale, std * scale
    return f"{m:{fmt}}" + ("" if math.isnan(s) else f" ± {s:{fmt.lstrip('+')}}")


def sweep_markdown(rows: list[dict[str, Any]], keys: list[str], seeds: list[int]) -> str:
    gains = any("elmo_gain_mean" in r for r in rows)
    head = ["point", *keys, "strategy", "test accuracy (mean ± std)"]
    head += ["gain over static, pt (mean ± std)"] if gains else []
    head += ["best val accuracy", *[f"seed {s}" for s in seeds]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # the best point among the strategies (the ablation is their yardstick, not a candidate)
    best = max(
        [r for r in rows if r["strategy"] != ABLATION] or rows,
        key=lambda r: r["val_accuracy_mean"],
    )
    for r in rows:
        mark = " **(best val)**" if r is best else ""
        cells = [f"{r['point_index']}{mark}", *[str(r["point"][k]) for k in keys], r["strategy"]]
        cells.append(_pm(r["test_accuracy_mean"], r["test_accuracy_std"], ".4f"))
        if gains:
            has = "elmo_gain_mean" in r
            cells.append(
                _pm(r["elmo_gain_mean"], r["elmo_gain_std"], "+.2f", 100.0) if has else "—"
            )
        cells += [
            _pm(r["val_accuracy_mean"], r["val_accuracy_std"], ".4f"),
            *[f"{a:.4f}" for a in r["test_accuracy"]],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@flow(name="elmo-news-sweep", task_runner=THREADS)
def elmo_news_sweep(params: SweepParams) -> dict[str, Any]:
    """Sweep the classifier over the grid x seeds (strategies default: wsum; the static
    ablation beside them unless ``ablation`` is off)."""
    cfg = params.resolve()
    runner, address = params.runner()
    points = params.points()
    seed_list = [cfg.classifier.seed + i for i in range(params.seeds)]
    logged_params = {
        "profile": params.profile,
        "data": params.data,
        "grid": params.grid,
        "seeds": seed_list,
        "strategies": params.strategies,
        "ablation": params.ablation,
        "bilm": params.bilm,
        "task_runner": runner,
    }
    keys = list(params.grid)
    with parent_run(
        params.home_dir(), params.profile, logged_params, kind="sweep", name_prefix="sweep-"
    ) as run:
        h, tracker, parent, timings = run.home, run.tracker, run.run_id, run.timings
        home_s = str(h.root)
        trained = params.trained()
        n_fits = len(points) * len(trained) * len(seed_list)
        with fanout(runner, address, h.root, n_fits) as fan:
            up = upstream(params, cfg, h, tracker, fan, timings, with_baseline=False)
            logged = log_upstream(tracker, up, params, cfg)
            jobs = []  # (point index, strategy, seed, args, point run id, future)
            clock = time.perf_counter()
            for i, point in enumerate(points):
                for s in trained:
                    point_run = tracker.client.create_run(
                        tracker.experiment_id,
                        run_name=f"point-{i}-{s}",
                        tags={
                            "mlflow.parentRunId": parent,
                            "stage": "sweep-point",
                            "strategy": s,
                            "sweep_point": str(i),
                        },
                    ).info.run_id
                    tracker.log_params(point_run, {**point, "strategy": s, "seeds": seed_list})
                    target = {"uri": tracker.uri, "parent_run_id": point_run}
                    ctx = StageContext(home_s, params.device, target)
                    for k in range(len(seed_list)):
                        c = params.classifier_config(point, k)
                        args = (up.feats, up.bilm_dir, up.dataset, s, c, ctx)
                        future = fan.submit(in_home(classify, h), *args)
                        jobs.append((i, s, seed_list[k], args, point_run, future))
            dirs = [j[5].result() for j in jobs]
            timings["classifiers"] = time.perf_counter() - clock

        rows: dict[tuple[int, str], dict[str, Any]] = {}
        for (i, s, seed, _, point_run, _), d in zip(jobs, dirs, strict=True):
            child = Tracker(tracker.uri, point_run)
            tags = {
                **logged["common"],
                "strategy": s,
                "seed": str(seed),
                "code_version": CLASSIFIER.code_version(),
            }
            name = f"classifier-{s}-seed{seed}"
            run_id, cached = child.log_stage(name, Path(d), tags, logged["splits"])
            tracker.client.update_run(run_id, name=name)  # a live run has the task's name
            m = read_json(Path(d) / "metrics.json")
            row = rows.setdefault(
                (i, s),
                {
                    "point_index": i,
                    "point": points[i],
                    "strategy": s,
                    "run_id": point_run,
                    "seeds": [],
                    "test_accuracy": [],
                    "val_accuracy": [],
                    "dirs": [],
                    "cached": [],
                },
            )
            row["seeds"].append(seed)
            row["test_accuracy"].append(m["test_accuracy"])
            row["val_accuracy"].append(m["best_val_accuracy"])
            row["dirs"].append(d)
            row["cached"].append(cached)
        for r in rows.values():
            r["test_accuracy_mean"], r["test_accuracy_std"] = mean_std(r["test_accuracy"])
            r["val_accuracy_mean"], r["val_accuracy_std"] = mean_std(r["val_accuracy"])
        add_gains(list(rows.values()))
        for r in rows.values():
            for k, seed in enumerate(r["seeds"]):
                per_seed: dict[str, float] = {
                    m: r[m][k] for m in ("test_accuracy", "elmo_gain") if m in r
                }
                tracker.log_metrics(r["run_id"], per_seed, step=seed)
            tracker.log_metrics(
                r["run_id"],
                {k: r[k] for k in r if k.endswith(("_mean", "_std")) and not math.isnan(r[k])},
            )
            tracker.finish(r["run_id"])
            prefix = f"point{r['point_index']}.{r['strategy']}"
            tracker.log_metrics(
                parent,
                {f"{prefix}.{k}": r[k] for k in ("test_accuracy_mean", "elmo_gain_mean") if k in r},
            )
        table = list(rows.values())
        run.log_timings()
        md = sweep_markdown(table, keys, seed_list)
        md += (
            f"\n\n{len(jobs)} classifier fits ({len(points)} points x {len(trained)} "
            f"strategies x {len(seed_list)} seeds) on {runner}"
            + (f" ({len(fan.workers)} Dask workers)" if fan.workers else "")
            + f": {timings['classifiers']:.0f} s; std is the sample std over seeds"
            + ("; a gain is paired by seed (strategy - static)." if params.ablation else ".")
        )
        return run.publish(
            f"elmo-news sweep ({params.profile})",
            md,
            "elmo-news-sweep",
            "Test accuracy per grid point: mean ± std over seeds",
            {
                "bilm": up.bilm_dir,
                "features": up.feats,
                "grid": params.grid,
                "seeds": seed_list,
                "points": table,
                "timings": timings,
                "task_runner": runner,
                "dask_workers": fan.workers,
                "markdown": md,
            },
            h.runs / "sweeps" / f"{parent}.json",
        )
