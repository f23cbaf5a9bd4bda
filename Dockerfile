# syntax=docker/dockerfile:1
# The icm moderation server (`icm serve`) as an image: docs/operations.md#container.
# Not built on the machines this project is developed on (no Docker daemon there): tests/test_container.py
# checks this file statically, and .ci/run builds it wherever `docker info` works.
ARG PYTHON_VERSION=3.12

# ---- build: a virtual environment with icm and its serve and offline extras, as the README installs them
FROM python:${PYTHON_VERSION}-slim AS build
# constraints.txt pins torch (the [objects] extra needs it) to a CPU build: take it from PyTorch's CPU index,
# since PyPI's Linux wheel of the same version is the multi-GB CUDA one.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
# psycopg: the PostgreSQL driver of --db postgresql+psycopg://... (compose.yaml's database)
RUN python -m venv /opt/icm \
 && /opt/icm/bin/pip install -c constraints.txt ".[serve,offline]" "psycopg[binary]>=3.1" \
 && /opt/icm/bin/icm --version

# ---- runtime: the environment alone, run by an unprivileged user
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 icm \
 && useradd --system --uid 10001 --gid icm --home-dir /var/lib/icm --create-home --shell /usr/sbin/nologin icm \
 && install -d -o icm -g icm /var/lib/icm/images /var/lib/icm/cache  # volumes mounted here start owned by icm
COPY --from=build /opt/icm /opt/icm
ENV PATH=/opt/icm/bin:$PATH PYTHONUNBUFFERED=1 ICM_CACHE_DIR=/var/lib/icm/cache
WORKDIR /var/lib/icm
USER icm:icm
EXPOSE 8000
# /readyz: 200 once the server can take requests (database reachable, model loaded), else 503
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["icm", "serve"]
# Without --api-key or $ICM_API_KEYS the server refuses to listen on 0.0.0.0: give keys (compose.yaml does).
CMD ["--host", "0.0.0.0", "--port", "8000", "--db", "/var/lib/icm/decisions.sqlite"]
