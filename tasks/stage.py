"""A stage declared once: its name, which task parameters are its inputs and its config, and
the module that builds it. From that one declaration come its cache key, its folder in the
home, its Prefect task and its cache policy.

One cache story: the stage folder and its manifest are the truth. Prefect's cache key is the
same key, and a cached Prefect result is used only while its folder verifies against its
manifest; a missing or corrupt folder makes the task run again, which rebuilds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from storage.hashing import code_version, stage_key
from storage.paths import Home, build_stage, stage_id, verify_complete

P = ParamSpec("P")
R = TypeVar("R")


def folder_ref(value: str | Sequence[str] | None) -> str:
    """The content address of an input that is a stage folder, a list of them, or absent."""
    if value is None:
        return ""
    if isinstance(value, str):
        return stage_id(value)
    return ",".join(stage_id(v) for v in value)


def config_value(value: Any) -> Any:
    """A config parameter as it enters the key: a dataclass as its dict, the rest as is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


@dataclasses.dataclass(frozen=True)
class StageContext:
    """Where a stage's folder lives and how its task runs; none of it enters the key."""

    home: str  # the home folder: the stage's folder is <home>/<stage>/<key>
    device: str = "auto"  # auto | cpu | cuda
    # the flow's MLflow target ({"uri", "parent_run_id"}): the stage's live child run
    tracking: dict[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # the stage's name in its key
    module: str  # the module that builds it: its import closure is the stage's code version
    # task parameters that are inputs, each with how its content address is read (default:
    # a stage folder's name, which is its own key)
    inputs: Mapping[str, Callable[[Any], str]]
    config: tuple[str, ...]  # task parameters that are the stage's config
    folder_name: str  # its folder in the home (stages that make the same kind of thing share one)

    def code_version(self) -> str:
        return code_version([self.module])

    def key(self, params: Mapping[str, Any]) -> str:
        """The stage's key from a task's parameters (the ones it does not declare are
        outside the key: the context, ...)."""
        inputs = {n: ref(params.get(n)) for n, ref in self.inputs.items()}
        config = {n: config_value(params.get(n)) for n in self.config}
        return stage_key(self.name, inputs, config, [self.module])

    def folder(self, params: Mapping[str, Any]) -> Path:
        return Home(params["ctx"].home).stage_dir(self.folder_name, self.key(params))

    def built(self, params: Mapping[str, Any]) -> bool:
        """Whether the folder for these parameters is complete (a run would reuse it)."""
        return verify_complete(self.folder(params))[0]

    def build(self, params: Mapping[str, Any], build: Callable[[Path], Any]) -> str:
        """Build the stage's folder for these parameters (or find it complete)."""
        return build_stage(self.folder(params), build)

    def task(self, name: str, **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]:
        """The stage's Prefect task: persisted result, cached by the stage's key while its
        folder verifies."""
        return task(
            name=name,
            cache_policy=StageCache(stage=self),
            persist_result=True,
            cache_result_in_memory=False,
            **options,
        )


def stage(
    name: str,
    module: str,
    inputs: Sequence[str] | Mapping[str, Callable[[Any], str]] = (),
    config: Sequence[str] = (),
    folder: str = "",
) -> Stage:
    """Declare a stage (``inputs`` by name are stage folders; its folder in the home is
    ``<home>/<folder or name>/<key>``)."""
    refs = dict(inputs) if isinstance(inputs, Mapping) else dict.fromkeys(inputs, folder_ref)
    return Stage(name, module, refs, tuple(config), folder or name)


@dataclasses.dataclass
class StageCache(CachePolicy):
    """Prefect's cache key = the stage's key. A cached result is offered only while the
    stage's folder verifies: otherwise its stale record (in the home, ``in_home``) is dropped
    first, so the task runs, rebuilds the folder and records its result under the key again."""

    stage: Stage | None = None

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        assert self.stage is not None
        home = Home(inputs["ctx"].home)
        key = self.stage.key(inputs)
        ok, _ = verify_complete(home.stage_dir(self.stage.folder_name, key))
        if not ok:
            (home.prefect_results / key).unlink(missing_ok=True)
        return key


def in_home(t: Task[P, R], home: Home) -> Task[P, R]:
    """A stage task whose Prefect results are stored in the home (beside its folders)."""
    return t.with_options(result_storage=home.prefect_results)
