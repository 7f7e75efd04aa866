"""The container image installs what the README's set-up installs: the same torch pin first,
then the project, every package of it copied in; both variants build from one Dockerfile."""

from __future__ import annotations

import re
import tomllib

from tests.conftest import ROOT


def _torch_pin(text: str) -> str:
    pins = set(re.findall(r"torch==([0-9][0-9.]*)", text))
    assert len(pins) == 1, pins
    return pins.pop()


def test_dockerfile_installs_what_the_readme_installs():
    docker = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    make = (ROOT / "Makefile").read_text()
    pinned = [d for d in project["project"]["dependencies"] if d.startswith("torch")]
    assert pinned == [f"torch=={_torch_pin(docker)}"]
    assert _torch_pin(make) == _torch_pin(docker)
    runs = [ln for ln in docker.splitlines() if ln.startswith("RUN pip install")]
    assert re.search(r"pip install -q torch==\S+", runs[0]), runs  # torch first, as `make venv`
    assert re.search(r"pip install -q \. ", runs[-1] + " "), runs  # then the project itself
    copied = set(re.findall(r"^COPY (\w+) \1$", docker, flags=re.M))
    assert copied == set(project["tool"]["setuptools"]["packages"])
    assert "COPY prefect.yaml" in docker and "WORKDIR /opt/elmo-news" in docker


def test_both_variants_and_the_deployments_image():
    docker = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS base-(\w+)$", docker, flags=re.M))
    assert stages == {"cpu", "cuda"}
    assert "FROM base-${VARIANT}" in docker
    assert "docker build -t elmo-news:cpu ." in docker
    assert "image: elmo-news:cpu" in (ROOT / "prefect.yaml").read_text()
