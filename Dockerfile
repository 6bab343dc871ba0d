# syntax=docker/dockerfile:1
# Two targets from one source tree:
#   docker build --target api    -t convtune-api .     # Flask API under gunicorn: no torch inside
#   docker build --target worker -t convtune-worker .  # Celery worker(s) with torch (CUDA build on x86_64)
# Both read CONVTUNE_* variables (README, "Processes and configuration").

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true
WORKDIR /app
RUN useradd --create-home --uid 10001 convtune
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY workers ./workers

FROM base AS api
RUN pip install .
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Auth is on: set CONVTUNE_AUTH_TOKENS (make entries with `convtune token NAME --scope ...`).
# The gunicorn config sets up Prometheus' multiprocess mode, so /metrics sums every worker process.
CMD ["gunicorn", "-c", "python:service.api.gunicorn_conf", "--workers", "4", "--bind", "0.0.0.0:8000", "service.api:create_app()"]

FROM base AS worker
# torch first, on its own layer: it is the big one and changes least.
ARG TORCH_SPEC="torch>=2.4"
# The range is deliberate: pin it with --build-arg TORCH_SPEC=torch==X for a given CUDA driver.
# hadolint ignore=DL3013
RUN pip install "${TORCH_SPEC}" && pip install ".[worker]"
ENV CONVTUNE_CHECKPOINT_DIR=/var/lib/convtune/checkpoints
RUN mkdir -p /var/lib/convtune/checkpoints && chown -R 10001 /var/lib/convtune
USER 10001
# One Celery process per visible GPU (CUDA_VISIBLE_DEVICES set per process), or one CPU worker.
CMD ["convtune", "worker"]
