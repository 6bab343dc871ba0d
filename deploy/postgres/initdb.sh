#!/bin/sh
# Runs once, when the postgres image starts on an empty data directory (/docker-entrypoint-initdb.d).
# One role and database per client, so each holds only its own password:
#   mlflow    owns mlflow (runs, metrics, params, tags) and mlflow_auth (MLflow's users and permissions)
#   convtune  owns convtune (the Optuna study storage the API and every worker share)
# Later password changes: deploy/README.md, "Rotating passwords and tokens".
set -eu
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}" "${CONVTUNE_DB_PASSWORD:?set CONVTUNE_DB_PASSWORD}"
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
     -v mlflow_password="$MLFLOW_DB_PASSWORD" -v convtune_password="$CONVTUNE_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE ROLE convtune LOGIN PASSWORD :'convtune_password';
CREATE DATABASE convtune OWNER convtune;
REVOKE ALL ON DATABASE mlflow, mlflow_auth, convtune FROM PUBLIC;
SQL
