# syntax=docker/dockerfile:1
# One target per service the stack runs (deploy/docker-compose.yml, deploy/k8s/):
#   docker build --target api      -t convtune-api .       # Flask API under gunicorn: no torch inside
#   docker build --target worker   -t convtune-worker .    # Celery worker(s) with torch (CUDA build on x86_64)
#   docker build --target mlflow   -t convtune-mlflow .    # MLflow tracking server and UI: basic auth, Postgres driver
#   docker build --target flower   -t convtune-flower .    # Celery's monitor (optional), basic auth
#   docker build --target postgres -t convtune-postgres .  # Postgres with convtune's roles and databases
# Redis is the official image, pinned in the compose file and the k8s manifests.
# Every base is pinned by version and every package is installed here, at build time: a container
# installs nothing when it starts. The API and worker read CONVTUNE_* variables (README, "Processes and
# configuration"); deploy/README.md says which each service needs.

FROM python:3.11.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    CONVTUNE_DEPLOYMENT=distributed
# CONVTUNE_DEPLOYMENT=distributed: a container is one host among several, so the API and the workers
# refuse to start unless CONVTUNE_STUDY_STORAGE is a database URL that all of them share.
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
# Per-epoch checkpoints: mount a volume every worker shares here (compose: the named volume
# `checkpoints`; k8s: a ReadWriteMany claim), so a trial redelivered to another host resumes.
ENV CONVTUNE_CHECKPOINT_DIR=/var/lib/convtune/checkpoints
RUN mkdir -p /var/lib/convtune/checkpoints && chown -R 10001 /var/lib/convtune
USER 10001
# One Celery process per visible GPU (CUDA_VISIBLE_DEVICES set per process), or one CPU worker.
CMD ["convtune", "worker"]

FROM python:3.11.11-slim-bookworm AS mlflow
# The tracking server and UI behind MLflow's basic-auth app, on Postgres (psycopg 3, the driver the
# API and workers use too). deploy/mlflow/basic_auth.ini names the users database; the connection
# comes from libpq's PGHOST, PGPORT, PGUSER and PGPASSWORD, the first admin from
# MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD, the CSRF key from
# MLFLOW_FLASK_SERVER_SECRET_KEY. Artifacts are proxied (mlflow-artifacts:/) into /artifacts.
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG_VERSION=3.3.9
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini
RUN pip install "mlflow[auth]==${MLFLOW_VERSION}" "psycopg[binary]==${PSYCOPG_VERSION}" \
    && useradd --create-home --uid 10001 mlflow \
    && mkdir -p /artifacts && chown 10001 /artifacts
COPY deploy/mlflow/basic_auth.ini /etc/mlflow/basic_auth.ini
USER 10001
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=5s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
CMD ["mlflow", "server", "--app-name", "basic-auth", "--host", "0.0.0.0", "--port", "5000", "--workers", "2", "--backend-store-uri", "postgresql+psycopg:///mlflow", "--artifacts-destination", "/artifacts"]

FROM python:3.11.11-slim-bookworm AS flower
# Celery's monitor: queues, workers, tasks. It reads the broker from CELERY_BROKER_URL and its login
# from FLOWER_BASIC_AUTH (user:password); it shows task arguments, so give it to operators only.
ARG FLOWER_VERSION=2.2.0
ARG CELERY_VERSION=5.7.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "flower==${FLOWER_VERSION}" "celery[redis]==${CELERY_VERSION}" \
    && useradd --create-home --uid 10001 flower
USER 10001
WORKDIR /home/flower
EXPOSE 5555
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5555/healthcheck', timeout=4)"]
CMD ["celery", "flower", "--address=0.0.0.0", "--port=5555"]

FROM postgres:16.6-bookworm AS postgres
# MLflow's and convtune's roles and databases, created on the first start (empty data directory)
# from MLFLOW_DB_PASSWORD and CONVTUNE_DB_PASSWORD; the superuser's password is POSTGRES_PASSWORD.
COPY deploy/postgres/initdb.sh /docker-entrypoint-initdb.d/10-convtune.sh
