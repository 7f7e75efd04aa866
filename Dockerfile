# The elmo-news flow's image, for the docker work pool (prefect.yaml: elmo-news-docker) and for
# Dask workers (`dask worker tcp://SCHEDULER:8786` in the same image sees the same code).
#   CPU:  docker build -t elmo-news:cpu .
#   CUDA: docker build --build-arg VARIANT=cuda -t elmo-news:cuda .
# The install step is the README's (make venv): torch==2.13.0 first, then the project; only
# the index torch comes from differs (the CPU image takes PyTorch's CPU wheel, not the CUDA
# one an unpinned install pulls).
ARG VARIANT=cpu

FROM python:3.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf /usr/bin/python3.11 /usr/local/bin/python
ENV TORCH_INDEX=https://pypi.org/simple

FROM base-${VARIANT}
ENV PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /opt/elmo-news
RUN python -m venv /opt/venv && pip install -q --upgrade pip
# torch first, pinned (as the README's set-up), then the project and the docker worker's package
RUN pip install -q torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY elmo_core elmo_core
COPY storage storage
COPY tasks tasks
COPY flows flows
COPY serving serving
COPY prefect.yaml ./
RUN pip install -q . prefect-docker
# the home and the data are volumes (prefect.yaml job_variables)
VOLUME ["/shared/elmo-news", "/data"]
CMD ["elmo-news", "--help"]
