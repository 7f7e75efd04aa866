"""Data-parallel pretraining under torchrun (gloo, 2 CPU ranks of 1 thread each): the same
parameters as one process over the same global batches; a killed rank fails the stage with a
clear error and a re-run resumes from the last checkpoint; another world size is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from elmo_core.bilm_checkpoint import load_bilm
from elmo_core.callbacks import no_log
from elmo_core.pretrain_config import PretrainConfig
from elmo_core.vocab_config import VocabConfig
from storage.hashing import ROOT
from storage.paths import read_json, write_json
from tasks.bilm_training import train_bilm
from tasks.corpus import CorpusConfig, read_pretrain_corpus
from tasks.ids import encode_ids
from tasks.pretrain import pretrain, torchrun_command
from tasks.stage import StageContext
from tasks.vocab import build_vocab
from tests.conftest import REUTERS

BILM = {"embedding_dim": 16, "hidden_dim": 16, "dropout": 0.0, "num_samples": 32}
TRAIN = PretrainConfig(
    epochs=1,
    max_steps=20,
    batch_size=16,
    window=10,
    lr=3e-3,
    val_tokens=200,
    checkpoint_every=0,
    precision="fp32",
)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("ddp_home"))
    c = read_pretrain_corpus.fn(
        str(REUTERS), CorpusConfig(max_docs=400, holdout_fraction=0.05), StageContext(home)
    )
    v = build_vocab.fn(None, [c], VocabConfig(min_count=2, max_size=3000), StageContext(home))
    return home, encode_ids.fn(None, [c], v, 3, StageContext(home)), v


def _env(mark: str = "") -> dict[str, str]:
    env = {**os.environ, "ELMO_NEWS_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT)
    if mark:
        env["ELMO_NEWS_TEST_MARK"] = mark
    return env


def test_two_ranks_reach_the_parameters_of_one_process(stages, tmp_path):
    home, ids, vocab = stages
    one, _, res1 = train_bilm(
        ids, vocab, tmp_path / "one", BILM, TRAIN, torch.device("cpu"), no_log
    )
    out = tmp_path / "two"
    out.mkdir()
    spec = out / "spec.json"
    from dataclasses import asdict

    write_json(
        spec,
        {
            "ids": ids,
            "vocab": vocab,
            "out": str(out),
            "bilm": BILM,
            "train": asdict(replace(TRAIN, world_size=2)),
            "device": "cpu",
            "tracking": None,
        },
    )
    proc = subprocess.run(
        torchrun_command(spec, 2, None), env=_env(), cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, _ = load_bilm(out / "bilm.pt")
    res2 = read_json(out / "result.json")
    assert res2["steps"] == res1.steps == 20 and res2["tokens"] == res1.tokens
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    # the training moved them (not a trivial equality of two initialisations)
    torch.manual_seed(TRAIN.seed)
    from elmo_core.bilm import BiLM

    init = BiLM(one.config)
    assert not torch.allclose(init.forward_lstms[0].weight_ih_l0, one.forward_lstms[0].weight_ih_l0)
    assert res2["val_perplexity_forward"] == pytest.approx(res1.val_perplexity_forward, rel=1e-3)


def _kill_rank_when_checkpointed(ckpt: Path, mark: str, killed: list[int]) -> None:
    """SIGKILL the torchrun rank with LOCAL_RANK=1 of this test once a checkpoint exists."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not ckpt.exists():
        time.sleep(0.05)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"ELMO_NEWS_TEST_MARK={mark}".encode() in env and b"LOCAL_RANK=1" in env:
            os.kill(int(pid), signal.SIGKILL)
            killed.append(int(pid))
            return


def test_a_killed_rank_fails_the_stage_and_a_rerun_resumes(stages, monkeypatch):
    home, ids, vocab = stages
    mark = uuid.uuid4().hex
    for k, v in _env(mark).items():
        monkeypatch.setenv(k, v)
    # the killer strikes at the first checkpoint (step 10): 70 steps are left to resume
    train = replace(TRAIN, world_size=2, max_steps=80, checkpoint_every=10)
    out = Path(home) / "bilm"
    killed: list[int] = []

    def killer() -> None:
        # the stage folder's name is its key: wait for its checkpoint
        while not out.exists() or not list(out.glob("*/train_state.pt")):
            time.sleep(0.05)
        _kill_rank_when_checkpointed(next(out.glob("*/train_state.pt")), mark, killed)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    with pytest.raises(RuntimeError, match="a re-run resumes from it"):
        pretrain.fn(ids, vocab, BILM, train, StageContext(home, "cpu"))
    t.join(5)
    assert killed, "no rank was killed"
    stage = pretrain.fn(ids, vocab, BILM, train, StageContext(home, "cpu"))  # resumes
    hist = json.loads((Path(stage) / "history.json").read_text())
    resumed = [h["value"] for h in hist if h["key"] == "resumed_from_step"]
    assert resumed and resumed[0] >= 10 and resumed[0] % 10 == 0
    assert read_json(Path(stage) / "metrics.json")["train_steps"] == 80
    assert not (Path(stage) / "train_state.pt").exists()


def test_a_checkpoint_of_another_world_size_is_refused(stages, tmp_path):
    home, ids, vocab = stages
    out = tmp_path / "ws"
    train_bilm(
        ids,
        vocab,
        out,
        BILM,
        replace(TRAIN, checkpoint_every=5, max_steps=5),
        torch.device("cpu"),
        no_log,
    )
    assert (out / "train_state.pt").exists()
    state = torch.load(out / "train_state.pt", weights_only=True)
    state["world_size"] = 2
    torch.save(state, out / "train_state.pt")
    with pytest.raises(ValueError, match="written by 2 rank"):
        train_bilm(ids, vocab, out, BILM, replace(TRAIN, max_steps=10), torch.device("cpu"), no_log)
