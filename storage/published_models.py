"""ELMo's published models in and out of the home: ``import_published`` turns options.json +
weights.hdf5 (paths or URLs, downloaded once into the home) into a biLM stage folder and
registers it as ``elmo-news-bilm``; ``export_published`` writes a char-encoder biLM of ours
in the published layout, for AllenNLP and bilm-tf."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from elmo_core.bilm import BiLM
from elmo_core.bilm_checkpoint import load_bilm, save_bilm
from elmo_core.published import (
    config_from_options,
    options_from_config,
    published_from_state,
    state_from_published,
)
from elmo_core.vocab import SPECIALS, Vocab
from storage.download import download
from storage.elmo_files import read_options, read_weights, write_elmo
from storage.hashing import hash_json, sha256_file, stage_key
from storage.paths import Home, build_stage, write_json

# the modules whose code makes an imported biLM what it is (its stage key includes them)
IMPORT_MODULES = ["elmo_core.published", "elmo_core.bilm", "elmo_core.bilm_checkpoint"]


def local_copy(ref: str, home: Home) -> Path:
    """A path, or a URL downloaded once into ``<home>/downloads`` (length-checked)."""
    if not ref.startswith(("http://", "https://")):
        return Path(ref).expanduser()
    folder = home.downloads / hashlib.sha256(ref.encode()).hexdigest()[:16]
    return download(ref, folder / (ref.rstrip("/").rsplit("/", 1)[-1] or "file"))


def load_published(options_path: Path, weights_path: Path) -> BiLM:
    """A published ELMo model as a biLM (eval mode; vocabulary: the specials, every word
    spelled by its character encoder)."""
    config = config_from_options(read_options(options_path))
    model = BiLM(config)
    model.set_words(SPECIALS)
    model.load_state_dict(
        state_from_published(read_weights(weights_path), config, model.state_dict())
    )
    return model.eval()


def import_published(options_ref: str, weights_ref: str, home: Home) -> dict[str, Any]:
    """Build (or find) the biLM stage folder of a published ELMo model and register it.
    Returns the folder, the registered version's URI and the recorded tags."""
    options_path, weights_path = local_copy(options_ref, home), local_copy(weights_ref, home)
    options = read_options(options_path)
    config = config_from_options(options)
    weights_sha = sha256_file(weights_path)
    tags = {
        "source": f"published ELMo: {options_ref} + {weights_ref}",
        "options_sha256": hash_json(options),
        "weights_sha256": weights_sha,
    }
    inputs = {"options": tags["options_sha256"], "weights": weights_sha}
    key = stage_key("bilm-import", inputs, asdict(config), IMPORT_MODULES)[:24]
    folder = home.stage_dir("bilm", key)

    def build(out: Path) -> None:
        model = load_published(options_path, weights_path)
        save_bilm(out / "bilm.pt", model, Vocab(SPECIALS, (1,) * len(SPECIALS)))
        write_json(out / "config.json", {"bilm": asdict(config), "imported": tags})
        write_json(out / "metrics.json", {"parameters": sum(p.numel() for p in model.parameters())})

    build_stage(folder, build)
    return {"bilm": str(folder), "config": asdict(config), "tags": tags}


def export_published(bilm_dir: Path, out: Path) -> dict[str, Any]:
    """A biLM stage folder -> ``out/options.json`` + ``out/weights.hdf5``."""
    model, _ = load_bilm(bilm_dir / "bilm.pt")
    options = options_from_config(model.config)
    write_elmo(out, options, published_from_state(model.state_dict(), model.config))
    return {"options": str(out / "options.json"), "weights": str(out / "weights.hdf5")}


def import_and_register(options_ref: str, weights_ref: str, home: Home) -> dict[str, Any]:
    """``import_published``, then the folder registered as ``elmo-news-bilm`` (once per
    folder: importing the same files again returns the same version), from an MLflow run of
    its own in the home's store."""
    from storage.registry import register_bilm
    from storage.tracking import Tracker

    info = import_published(options_ref, weights_ref, home)
    tracker = Tracker(home.mlflow_uri())
    run_id = tracker.start_parent(
        "import-bilm", {"options": options_ref, "weights": weights_ref}, {"kind": "import-bilm"}
    )
    try:
        registry = register_bilm(home.mlflow_uri(), run_id, Path(info["bilm"]), info["tags"])
    except BaseException:
        tracker.finish(run_id, "FAILED")
        raise
    tracker.finish(run_id)
    return {"bilm": info["bilm"], "registry": registry["uri"], **info["tags"]}


def export_model(ref: str, out: Path, home: Home) -> dict[str, Any]:
    """``export_published`` of a ``models:/elmo-news-bilm/N`` (or @alias) or a biLM folder."""
    from storage.registry import resolve_bilm

    folder, _ = resolve_bilm(ref, home.root / "bilm", home.mlflow_uri())
    return export_published(folder, out)
