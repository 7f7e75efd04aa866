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
    PublishedFormatError,
    config_from_options,
    config_from_token_options,
    options_from_config,
    published_from_state,
    state_from_published,
    tokens_from_vocab_file,
    vocab_file_tokens,
)
from elmo_core.vocab import SPECIALS, Vocab
from storage.download import download
from storage.elmo_files import read_options, read_vocab, read_weights, write_elmo
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


def load_published(
    options_path: Path,
    weights_path: Path,
    embedding_path: Path | None = None,
    vocab_path: Path | None = None,
) -> tuple[BiLM, Vocab]:
    """A published ELMo model as a biLM (eval mode) and its vocabulary: the char_cnn form
    (vocabulary: the specials; every word spelled by the character encoder), or bilm-tf's
    token-input form (``embedding_path`` + ``vocab_path``: a word table)."""
    options = read_options(options_path)
    arrays = read_weights(weights_path)
    if embedding_path is None or vocab_path is None:
        config = config_from_options(options)
        vocab = Vocab(SPECIALS, (1,) * len(SPECIALS))
    else:
        tokens = tokens_from_vocab_file(read_vocab(vocab_path))
        try:
            vocab = Vocab(tuple(tokens), (1,) * len(tokens))
        except ValueError as e:
            raise PublishedFormatError(f"{vocab_path}: {e}") from e
        config = config_from_token_options(options, len(tokens))
        arrays = {**arrays, **read_weights(embedding_path)}
    model = BiLM(config)
    model.set_words(vocab.tokens)
    model.load_state_dict(state_from_published(arrays, config, model.state_dict()))
    return model.eval(), vocab


def import_published(
    options_ref: str,
    weights_ref: str,
    home: Home,
    embedding_ref: str = "",
    vocab_ref: str = "",
) -> dict[str, Any]:
    """Build (or find) the biLM stage folder of a published ELMo model (with
    ``embedding_ref`` + ``vocab_ref``: bilm-tf's token-input form). Returns the folder, its
    config and the tags to record."""
    refs = [options_ref, weights_ref, *([embedding_ref, vocab_ref] if embedding_ref else [])]
    paths = [local_copy(r, home) for r in refs]
    options = read_options(paths[0])
    weights_sha = sha256_file(paths[1])
    tags = {
        "source": "published ELMo: " + " + ".join(refs),
        "options_sha256": hash_json(options),
        "weights_sha256": weights_sha,
    }
    inputs = {
        "options": tags["options_sha256"],
        "files": ",".join(sha256_file(p) for p in paths[1:]),
    }
    key = stage_key("bilm-import", inputs, {}, IMPORT_MODULES)[:24]
    folder = home.stage_dir("bilm", key)
    config: dict[str, Any] = {}

    def build(out: Path) -> None:
        model, vocab = load_published(*paths)
        config.update(asdict(model.config))
        save_bilm(out / "bilm.pt", model, vocab)
        write_json(out / "config.json", {"bilm": config, "imported": tags})
        write_json(out / "metrics.json", {"parameters": sum(p.numel() for p in model.parameters())})

    build_stage(folder, build)
    return {"bilm": str(folder), "tags": tags}


def export_published(bilm_dir: Path, out: Path) -> dict[str, Any]:
    """A biLM stage folder -> ``out/options.json`` + ``out/weights.hdf5`` (a word-encoder
    biLM: bilm-tf's token-input form, with ``embedding.hdf5`` and ``vocab.txt``)."""
    model, vocab = load_bilm(bilm_dir / "bilm.pt")
    options = options_from_config(model.config)
    arrays = published_from_state(model.state_dict(), model.config)
    words = None if model.config.token_encoder == "char" else vocab_file_tokens(vocab.tokens)
    write_elmo(out, options, arrays, words)
    return {"files": sorted(str(p) for p in out.iterdir() if not p.name.startswith("."))}


def import_and_register(
    options_ref: str, weights_ref: str, home: Home, embedding_ref: str = "", vocab_ref: str = ""
) -> dict[str, Any]:
    """``import_published``, then the folder registered as ``elmo-news-bilm`` (once per
    folder: importing the same files again returns the same version), from an MLflow run of
    its own in the home's store."""
    from storage.registry import register_bilm
    from storage.tracking import Tracker

    info = import_published(options_ref, weights_ref, home, embedding_ref, vocab_ref)
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
