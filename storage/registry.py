"""MLflow model registry: log the best classifier (biLM + vocab + head, no pickles), register it as
``elmo-news-classifier`` and move the ``champion`` alias only when it beats the current champion on
the same validation split; otherwise it becomes ``challenger`` and the run says why.

A version's validation accuracy is measured through its own pyfunc (the path users predict with)
and recorded as version tags with the split's key; a champion recorded on another split is
measured again on this one, so the comparison is always on the same documents."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from storage.hashing import ROOT
from storage.tracking import store_lock

MODEL_NAME = "elmo-news-classifier"
MODEL_CODE = ROOT / "serving" / "classifier_model.py"
# the project packages a served model's code imports (copied beside it, on its sys.path)
MODEL_PACKAGES = [str(ROOT / p) for p in ("elmo_core", "storage", "serving")]


def _val_accuracy(model_uri: str, texts: list[str], labels: np.ndarray) -> float:
    import mlflow.pyfunc
    import pandas as pd

    pred = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"text": texts}))
    return float((pred["label"].to_numpy() == labels).mean())


def check_model_uri(uri: str, tracking_uri: str | None = None) -> Any:
    """A ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI must name an existing version
    before a command loads it; raises ValueError naming the URI and what is missing, else
    returns that ModelVersion. Other URIs (runs:/, paths) are left to MLflow (None).
    ``tracking_uri``: the store to look in (default: MLflow's current one)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not uri.startswith("models:/"):
        return None
    ref = uri.removeprefix("models:/").rstrip("/")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, version = ref.split("/", 1)
            return client.get_model_version(name, version)
        else:
            raise ValueError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    except MlflowException as e:
        known = [m.name for m in client.search_registered_models()]
        raise ValueError(
            f"{uri}: no such model version in {tracking_uri or mlflow_uri()} (registered models: "
            f"{', '.join(known) or 'none'}; {e.message.split('.')[0]})"
        ) from None


def logged_model_id(version: Any) -> str | None:
    """The LoggedModel behind a registered version (its source is ``models:/<model id>``)."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def model_signature(label_names: list[str]) -> Any:
    """The pyfunc's declared schema: a ``text`` column in; the label id (int64, never missing),
    its name and one float64 probability per class out. Declared, not inferred from an example,
    so MLflow has nothing to guess (its "integer column" hint came from inferring it)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    outputs: list[ColSpec | TensorSpec] = [
        ColSpec("long", "label"),
        ColSpec("string", "label_name"),
    ]
    outputs += [ColSpec("double", f"p_{name}") for name in label_names]
    inputs: list[ColSpec | TensorSpec] = [ColSpec("string", "text")]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def _create_model(client: Any, name: str, description: str) -> None:
    """Create a registered model; one created meanwhile by another run is not an error."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=description)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _versions_with(
    uri: str, name: str, description: str, tag: str, key: str
) -> tuple[Any, list[Any]]:
    """(a client of the store at ``uri``, the versions of registered model ``name`` tagged
    ``tag=key``), the model created first if it is new (under the store's lock)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    with store_lock(uri):
        try:
            client.get_registered_model(name)
        except MlflowException:
            _create_model(client, name, description)
        existing = client.search_model_versions(f"name='{name}' and tags.{tag}='{key}'")
    return client, list(existing)


def register_and_gate(
    uri: str,
    parent_run_id: str,
    model_run_id: str,
    key: str,
    split_key: str,
    bilm_pt: Path,
    classifier_pt: Path,
    val_texts: list[str],
    val_labels: np.ndarray,
    label_names: list[str],
) -> dict[str, Any]:
    """Log + register the candidate (once per classifier key), compare it with the champion on
    the given validation split, set the alias, record the decision on the parent run."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    client, existing = _versions_with(
        uri, MODEL_NAME, "elmo-news: ELMo features + BiLSTM classifier", "classifier_key", key
    )
    if existing:
        version = existing[0]
    else:
        example = pd.DataFrame({"text": val_texts[:3]})
        with mlflow.start_run(run_id=model_run_id):
            info = mlflow.pyfunc.log_model(
                name="elmo-news-classifier",
                python_model=str(MODEL_CODE),
                artifacts={"bilm": str(bilm_pt), "classifier": str(classifier_pt)},
                code_paths=MODEL_PACKAGES,
                signature=model_signature(label_names),
                input_example=example,
                pip_requirements=["torch==2.13.0", "mlflow>=3.17", "pandas", "numpy"],
            )
        version = mlflow.register_model(info.model_uri, MODEL_NAME, tags={"classifier_key": key})

    def accuracy_of(v: Any) -> float:
        """A version's validation accuracy on this split: recorded once, else measured now."""
        tags = v.tags or {}
        if tags.get("val_split") == split_key and "val_accuracy" in tags:
            return float(tags["val_accuracy"])
        acc = _val_accuracy(f"models:/{MODEL_NAME}/{v.version}", val_texts, val_labels)
        client.set_model_version_tag(MODEL_NAME, v.version, "val_split", split_key)
        client.set_model_version_tag(MODEL_NAME, v.version, "val_accuracy", repr(acc))
        return acc

    version = client.get_model_version(MODEL_NAME, version.version)
    candidate_acc = accuracy_of(version)

    def gate() -> tuple[str, float, str]:
        """Read the champion, decide, set the alias: one step, so two runs finishing at once
        cannot both see "no champion" and both insert the alias."""
        try:
            champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
        except MlflowException:
            champion = None
        if champion is None:
            decision, champion_acc = "promoted: no champion yet", float("nan")
        elif champion.version == version.version:
            decision, champion_acc = "already champion", candidate_acc
        else:
            champion_acc = accuracy_of(champion)
            if candidate_acc > champion_acc:
                decision = f"promoted: val accuracy {candidate_acc:.4f} > champion v{champion.version} {champion_acc:.4f}"
            else:
                decision = (
                    f"not promoted: val accuracy {candidate_acc:.4f} <= champion v{champion.version} "
                    f"{champion_acc:.4f} on the same validation split"
                )
        alias = "champion" if decision.startswith(("promoted", "already")) else "challenger"
        client.set_registered_model_alias(MODEL_NAME, alias, version.version)
        return decision, champion_acc, alias

    # a local sqlite store: a file lock makes the gate atomic across processes; a tracking server
    # (no lock here) may still refuse a concurrent alias insert: decide again on the new state
    for attempt in range(3):
        try:
            with store_lock(uri):
                decision, champion_acc, alias = gate()
            break
        except MlflowException:
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))
    metrics = {"registry_candidate_val_accuracy": candidate_acc}
    if not np.isnan(champion_acc):
        metrics["registry_champion_val_accuracy"] = champion_acc
    for k, v in metrics.items():
        client.log_metric(parent_run_id, k, v)
    client.set_tag(parent_run_id, "registry_decision", decision)
    client.set_tag(parent_run_id, "registry_version", str(version.version))
    client.set_tag(parent_run_id, "registry_alias", alias)
    return {
        "version": int(version.version),
        "alias": alias,
        "decision": decision,
        "model_id": logged_model_id(version),
        **metrics,
    }


# ------------------------------------------------------------------------------ the biLM

BILM_MODEL_NAME = "elmo-news-bilm"
BILM_CODE = ROOT / "serving" / "bilm_model.py"


def register_bilm(uri: str, run_id: str, bilm_dir: Path, tags: dict[str, str]) -> dict[str, Any]:
    """Log a pretrained biLM's stage folder as an MLflow model on ``run_id`` and register it as
    ``elmo-news-bilm`` (once per biLM key: re-running the same pretraining returns the version
    it already has). ``tags`` (corpus hash, token count, perplexities) go on the version."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    key = bilm_dir.name
    client, existing = _versions_with(
        uri,
        BILM_MODEL_NAME,
        "elmo-news: a biLM pretrained on unlabeled text, reused by "
        "`elmo-news run --bilm models:/elmo-news-bilm/<version>`",
        "bilm_key",
        key,
    )
    if existing:
        version = existing[0]
    else:
        example = pd.DataFrame({"text": ["Stocks rallied on Friday.", "A new phone ships."]})
        signature = infer_signature(
            example, pd.DataFrame({"n_tokens": [4, 4], "embedding": [[0.0, 0.1], [0.2, 0.3]]})
        )
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="elmo-news-bilm",
                python_model=str(BILM_CODE),
                artifacts={"stage": str(bilm_dir)},
                code_paths=MODEL_PACKAGES,
                signature=signature,
                input_example=example,
                pip_requirements=["torch==2.13.0", "mlflow>=3.17", "pandas", "numpy"],
            )
        version = mlflow.register_model(
            info.model_uri, BILM_MODEL_NAME, tags={"bilm_key": key, **tags}
        )
    return {
        "name": BILM_MODEL_NAME,
        "version": int(version.version),
        "uri": f"models:/{BILM_MODEL_NAME}/{version.version}",
        "model_id": logged_model_id(version),
    }


def _bilm_folder(p: Path, bilm_root: Path) -> Path:
    """A biLM folder given as a path. A stage folder (named by its 24-hex key, as pretraining
    names it) is used in place; any other is copied once into ``bilm_root/dir-<sha256 of
    bilm.pt>``: a folder's name is its cache key downstream, and a user's "my-bilm" must not
    stand for two different biLMs."""
    import re
    import shutil

    from storage.hashing import sha256_file
    from storage.paths import verify_complete

    if not (p / "bilm.pt").exists():
        raise ValueError(f"{p}: not a biLM stage folder (no bilm.pt)")
    ok, why = verify_complete(p)
    if not ok:
        raise ValueError(f"{p}: incomplete biLM stage folder ({why})")
    if re.fullmatch(r"[0-9a-f]{24}", p.name):
        return p
    out = bilm_root / f"dir-{sha256_file(p / 'bilm.pt')[:24]}"
    if not verify_complete(out)[0]:
        staging = bilm_root / f".{out.name}.copy"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(p, staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out


def resolve_bilm(
    ref: str, bilm_root: Path, tracking_uri: str | None = None
) -> tuple[Path, dict[str, str]]:
    """A ``--bilm`` reference → a complete biLM stage folder (and what to record about it).

    ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``: the version's stage folder, downloaded
    once into ``bilm_root/<biLM key>`` — the folder name the pretraining gave it, so every
    downstream cache key (layers, classifiers) is the same as for the run that pretrained it.
    A path: a biLM stage folder (``bilm.pt`` + a valid DONE manifest), see ``_bilm_folder``.
    ``tracking_uri``: the registry to read (the run's home store; default MLflow's current
    one), so a flow called from Python or a deployment finds its home's models."""
    import shutil
    import tempfile

    from storage.paths import verify_complete

    if not ref.startswith("models:/"):
        return _bilm_folder(Path(ref), bilm_root), {"bilm_source": str(Path(ref).resolve())}
    import mlflow

    v = check_model_uri(ref, tracking_uri)  # the version, read once
    name = v.name
    key = (v.tags or {}).get("bilm_key")
    if not key:
        raise ValueError(f"{ref}: model version {v.version} of {name} is not an elmo-news biLM")
    info = {
        "bilm_source": f"models:/{name}/{v.version}",
        "bilm_model_id": logged_model_id(v) or "",
    }
    out = bilm_root / key
    ok, _ = verify_complete(out)
    if ok:
        return out, info
    bilm_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bilm_root) as tmp:
        got = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{v.version}",
                dst_path=tmp,
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
            )
        )
        stage = next(p.parent for p in got.rglob("bilm.pt"))
        staging = bilm_root / f".{key}.download"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(stage, staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    ok, why = verify_complete(out)
    if not ok:
        raise ValueError(f"{ref}: downloaded biLM fails its manifest ({why})")
    return out, info
