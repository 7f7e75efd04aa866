"""Typed run parameters: profiles plus overrides, validated into the stage dataclasses before a
run starts (pydantic validates the dataclasses, so their own checks run too)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from elmo_core.bilm_config import BiLMConfig
from elmo_core.classifier import check_token_embedding
from elmo_core.classifier_config import ClassifierConfig
from elmo_core.device import pick_device, resolve_precision
from elmo_core.layers_config import LayersConfig
from elmo_core.mix import MIX_STRATEGIES
from elmo_core.pretrain_config import AdaptConfig, PretrainConfig
from elmo_core.vocab_config import VocabConfig
from flows.fanout import resolve_runner
from storage.download import AG_NEWS_URL
from tasks.baseline import BaselineConfig
from tasks.corpus import CorpusConfig
from tasks.ingest import IngestConfig

Profile = Literal["smoke", "sample", "full", "seed", "news", "elmo-original"]
Strategy = Literal["sum", "wsum", "function"]
assert get_args(Strategy) == MIX_STRATEGIES


@dataclass(frozen=True)
class BiLMParams:
    """BiLMConfig without vocab_size (that comes from the vocabulary)."""

    embedding_dim: int = 256  # E
    hidden_dim: int = 256  # H
    num_layers: int = 2  # LSTM layers per direction
    dropout: float = 0.1
    num_samples: int = 512  # sampled-softmax negatives
    projection_dim: int = 0  # P: LSTM output projection (0 = none)
    cell_clip: float = 0.0  # cell-state clip per step (0 = off)
    proj_clip: float = 0.0  # output clip per step (0 = off)
    token_encoder: Literal["word", "char"] = "word"  # word table, or ELMo's character CNN
    char_dim: int = 16  # character embedding width
    char_filters: tuple[int, ...] = (32, 32, 64, 128, 128, 128, 128)  # per width 1..K
    char_highway: int = 2  # highway layers
    max_chars: int = 50  # bytes per word, boundaries included

    def __post_init__(self) -> None:
        BiLMConfig(vocab_size=5, **asdict(self))  # the same checks as the model's own config


SECTIONS: dict[str, type] = {
    "ingest": IngestConfig,
    "corpus": CorpusConfig,
    "vocab": VocabConfig,
    "bilm": BiLMParams,
    "pretrain": PretrainConfig,
    "adapt": AdaptConfig,
    "layers": LayersConfig,
    "classifier": ClassifierConfig,
    "baseline": BaselineConfig,
}

# what the profiles sized for a 2-core CPU share
CPU_PRETRAIN: dict[str, Any] = {"batch_size": 128, "window": 20, "lr": 2e-3, "val_tokens": 20_000}
# the classifier's budget is in optimizer steps, so one profile fits 500 documents and 120k:
# validation every 200 steps (~0.9 of an ag_news_sample epoch, several times an epoch of the
# full AG News, every ~25 epochs of 500 documents), stop after 3 without a gain, not before
# 600 steps (a small dataset's first epochs are a few dozen steps: the validation curve is
# still climbing there)
CPU_CLASSIFIER: dict[str, Any] = {
    "hidden_dim": 128,
    "mlp_hidden": (128, 64),
    "dropout": 0.4,
    "eval_every": 200,
    "patience": 3,
    "min_steps": 600,
    "max_steps": 6000,
    "batch_size": 64,
    "lr": 2e-3,
}
# ... and the profiles sized for a GPU
GPU_CLASSIFIER: dict[str, Any] = {
    "hidden_dim": 256,
    "eval_every": 1000,  # ~0.27 of a 120k-document epoch at batch 32
    "patience": 3,
    "min_steps": 3000,
    "max_steps": 40_000,
    "batch_size": 32,
    "lr": 1e-3,
}

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    # ~2k real rows, tiny dims, up to 340 classifier steps (four epochs of 1,350 documents):
    # the end-to-end check that the pipeline learns (every strategy well above chance; with two
    # epochs the function mix of the Reuters run had not left chance). The task embedding learns at 10x lr without
    # dropout: at 1x and dropout 0.1 some seeds sat on the chance plateau for whole epochs
    "smoke": {
        "ingest": {"limit_train": 1500, "limit_test": 200, "val_fraction": 0.1},
        "corpus": {"max_docs": 300, "holdout_fraction": 0.05},
        "vocab": {"min_count": 1, "max_size": 6000},
        "bilm": {"embedding_dim": 24, "hidden_dim": 24, "num_samples": 64},
        "pretrain": {"epochs": 1, "batch_size": 64, "val_tokens": 1000, "checkpoint_every": 50},
        "classifier": {
            "hidden_dim": 16,
            "mlp_hidden": (16,),
            "token_embedding_dim": 24,
            "dropout": 0.0,
            "eval_every": 85,
            "patience": 2,
            "min_steps": 170,
            "max_steps": 340,
            "batch_size": 16,
            "lr": 0.005,
            "embedding_lr_scale": 10.0,
            "checkpoint_every": 50,  # + every validation; a save per 5 steps cost ~1.2 s
        },
        # AG News documents (~40 tokens) run through the windowed path
        "layers": {"max_len": 32, "window": 24, "context": 4},
        "baseline": {"max_iter": 200},
    },
    # ag_news_sample (16k train rows) + Reuters: <= 45 min on 2 CPU cores without bf16 (AVX2
    # only, fp32). E = H = 192: on such a CPU a step runs at 9.5k tokens/s, 1.8x the 5.4k of
    # E = H = 256, so 3 epochs fit where 8 bf16 epochs of the 256-wide model fit on AMX
    "sample": {
        "vocab": {"min_count": 2, "max_size": 50_000},
        "bilm": {"embedding_dim": 192, "hidden_dim": 192, "num_samples": 512},
        "pretrain": {**CPU_PRETRAIN, "epochs": 3},
        # with `run --bilm`: the reused biLM learns the train split's words it lacks (3.6 % of
        # AG News' tokens were <unk> to the news-corpus biLM) and adapts to its text (and any
        # unlabeled text given) while a pass still lowers the val perplexity by 1 %, within
        # 2,500 steps of 128 x 20 tokens
        "adapt": {"epochs": 20, "min_gain": 0.01, "max_steps": 2500, "new_words_min_count": 2},
        # token_embedding_dim <= bilm.embedding_dim: initialised from it
        "classifier": {**CPU_CLASSIFIER, "token_embedding_dim": 192},
    },
    # the full 120k AG News on a 2-core CPU: fewer passes over 7x the text
    "full": {
        "vocab": {"min_count": 3, "max_size": 60_000},
        "bilm": {"embedding_dim": 256, "hidden_dim": 256, "num_samples": 512},
        "pretrain": {**CPU_PRETRAIN, "epochs": 2},
        "adapt": {"epochs": 1, "new_words_min_count": 3},
        "classifier": {**CPU_CLASSIFIER, "token_embedding_dim": 256, "max_steps": 8000},
    },
    # `elmo-news pretrain` on ../shared/data/news_corpus (+ Reuters): a standalone biLM in
    # <= 60 min on 2 CPU cores without bf16 (E = H = 192 runs ~9.5k tokens/s in fp32 there:
    # 7,000 steps of 128 x 20 = 17.9M tokens ≈ 33 min, ~0.35 of an epoch of the 51M-token
    # corpus; an AMX CPU does it in about half). The classifier settings are the sample
    # profile's, so `run --profile news --bilm ...` works too
    "news": {
        "vocab": {"min_count": 3, "max_size": 50_000},
        "bilm": {"embedding_dim": 192, "hidden_dim": 192, "num_samples": 512},
        "pretrain": {**CPU_PRETRAIN, "epochs": 1, "max_steps": 7000},
    },
    # ELMo's published biLM shapes (Peters et al. 2018; 1B Word Benchmark): 2 layers of 4096
    # cells with 512-wide projections, cell and projection clipping at 3, residual connection,
    # 8,192 sampled negatives, 20-token windows, ELMo's character CNN (filters 32-1024 over
    # widths 1-7, 2 highway layers, 50 bytes a word); for GPU users. The classifier reads
    # 2 x 512 layers
    "elmo-original": {
        "vocab": {"min_count": 3, "max_size": 800_000},
        "bilm": {
            "embedding_dim": 512,
            "hidden_dim": 4096,
            "projection_dim": 512,
            "cell_clip": 3.0,
            "proj_clip": 3.0,
            "dropout": 0.1,
            "num_samples": 8192,
            "token_encoder": "char",
            "char_dim": 16,
            "char_filters": (32, 32, 64, 128, 256, 512, 1024),
            "char_highway": 2,
            "max_chars": 50,
        },
        "pretrain": {"epochs": 10, "batch_size": 128, "window": 20, "lr": 1e-3},
        "classifier": {
            **GPU_CLASSIFIER,
            "num_layers": 1,
            "mlp_hidden": (256, 128),
            "token_embedding_dim": 512,
        },
    },
    # the original system's hyperparameters, for GPU users
    "seed": {
        "vocab": {"min_count": 2, "max_size": 80_000},
        "bilm": {"embedding_dim": 512, "hidden_dim": 512, "num_samples": 4096},
        "pretrain": {"epochs": 5, "batch_size": 128, "window": 20, "lr": 1e-3},
        "classifier": {
            **GPU_CLASSIFIER,
            "num_layers": 2,
            "mlp_hidden": (128, 64),
            "token_embedding_dim": 256,
        },
    },
}


@dataclass(frozen=True)
class Resolved:
    """The run's stage configs after profile + overrides."""

    ingest: IngestConfig
    corpus: CorpusConfig
    vocab: VocabConfig
    bilm: BiLMParams
    pretrain: PretrainConfig
    adapt: AdaptConfig
    layers: LayersConfig
    classifier: ClassifierConfig
    baseline: BaselineConfig


def resolve_sections(profile: str, overrides: dict[str, dict[str, Any]], device: str) -> Resolved:
    """Every section's config: dataclass defaults < the profile < ``overrides``; unknown
    sections or fields and bad values raise ValueError naming them."""
    unknown = set(overrides) - set(SECTIONS)
    if unknown:
        raise ValueError(
            f"unknown override sections {sorted(unknown)}; expected {sorted(SECTIONS)}"
        )
    out: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        merged = {**PROFILES[profile].get(name, {}), **overrides.get(name, {})}
        extra = set(merged) - {f.name for f in fields(cls)}
        if extra:
            raise ValueError(f"unknown {name} settings {sorted(extra)}")
        out[name] = TypeAdapter(cls).validate_python(merged)
    # "auto" precision becomes what this machine runs (bf16 where native), so cache keys and
    # the MLflow params name the precision a stage really trained in
    dev = pick_device(device)
    for name in ("pretrain", "adapt", "classifier"):
        cfg = out[name]
        out[name] = replace(cfg, precision=resolve_precision(cfg.precision, dev))
    return Resolved(**out)


class PretrainParams(BaseModel):
    """What ``elmo-news pretrain`` / the ``elmo-news-pretrain`` flow take: unlabeled text only.
    Uses the corpus, vocab, bilm and pretrain sections of a profile (+ overrides)."""

    model_config = ConfigDict(extra="forbid")

    corpus: list[str] = Field(min_length=1)  # files, folders, globs of unlabeled text
    profile: Profile = "smoke"
    home: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    register_model: bool = True  # register the biLM as elmo-news-bilm
    # multi-node torchrun flags replacing the single-node launch (pretrain.world_size > 1)
    torchrun_args: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> PretrainParams:
        self.resolve()
        return self

    def resolve(self) -> Resolved:
        out = resolve_sections(self.profile, self.overrides, self.device)
        if out.corpus.holdout_fraction <= 0:
            # the standalone biLM's perplexity comes from held-out corpus text
            raise ValueError(
                "corpus.holdout_fraction must be > 0 for pretraining on a corpus alone "
                f"(profile {self.profile!r} gives {out.corpus.holdout_fraction})"
            )
        return out

    def home_dir(self) -> str:
        return self.home or os.environ.get("ELMO_NEWS_HOME") or ".elmo-news"


class RunParams(BaseModel):
    """Everything a run takes. Unknown keys and bad values fail here, before any task runs."""

    model_config = ConfigDict(extra="forbid")

    profile: Profile = "smoke"
    data: str = AG_NEWS_URL  # folder, file or URL of a labelled dataset (train + test)
    # extra unlabeled text files: pretrained on with the train split, or, with ``bilm``, what
    # the reused biLM adapts on beside it (up to ``adapt.epochs`` passes)
    pretrain_corpus: list[str] = Field(default_factory=list)
    home: str | None = None  # default: $ELMO_NEWS_HOME or ./.elmo-news
    strategies: list[Strategy] = Field(
        default_factory=lambda: list[Strategy](["sum", "wsum", "function"])
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    text_columns: list[str] = Field(default_factory=list)  # user data: text columns
    label_column: str = ""  # user data: label column
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)  # section -> field -> value
    # a pretrained biLM (models:/elmo-news-bilm/N, @alias, or a stage folder): skips vocabulary
    # and pretraining; empty = pretrain one on the train split + pretrain_corpus
    bilm: str = ""
    # where the classifiers and the baseline run: thread | dask ("" = $ELMO_NEWS_TASK_RUNNER,
    # else thread) and the Dask scheduler (tcp://HOST:PORT; "" = a local cluster)
    task_runner: Literal["", "thread", "dask"] = ""
    dask_address: str = ""
    register_model: bool = True  # log the best classifier in the registry, gate the champion

    @model_validator(mode="after")
    def _check(self) -> RunParams:
        if not self.strategies:
            raise ValueError("strategies must name at least one of sum, wsum, function")
        resolved = self.resolve()  # raises on bad values
        if self.bilm and self.pretrain_corpus and not resolved.adapt.epochs:
            raise ValueError(
                "pretrain_corpus with bilm is text to adapt the reused biLM on: adapt.epochs "
                "must be > 0, got 0"
            )
        self.runner()
        return self

    def runner(self) -> tuple[str, str]:
        """(thread | dask, scheduler address) after the environment's defaults."""
        return resolve_runner(self.task_runner, self.dask_address)

    def resolve(self) -> Resolved:
        out = resolve_sections(self.profile, self.overrides, self.device)
        # here, not after pretraining (a reused biLM is checked when it is loaded)
        check_token_embedding(out.classifier, out.bilm.embedding_dim)
        ingest = replace(
            out.ingest, text_columns=tuple(self.text_columns), label_column=self.label_column
        )
        return replace(out, ingest=ingest)

    def home_dir(self) -> str:
        return self.home or os.environ.get("ELMO_NEWS_HOME") or ".elmo-news"

    def preflight(self) -> None:
        """A local dataset checked by ingestion's own rules before anything starts (a URL or
        an object store is checked by the flow's first task, once fetched)."""
        if "://" in self.data:
            return
        from tasks.ingest import preflight

        preflight(self.data, self.resolve().ingest)
