#!/bin/sh
# Start the MLflow tracking server on Postgres (backend store) and S3 (proxied artifacts).
#
# The Postgres password never appears on a command line (/proc/<pid>/cmdline is readable by every
# user of the host, and `ps` shows it) nor in the backend-store URI (MLflow echoes it in logs and
# hands it to its workers): the URI names the user only, and libpq (psycopg2) takes the password
# from the PGPASSWORD environment variable, which docker-compose.yml sets from POSTGRES_PASSWORD.
# Extra arguments are passed on to `mlflow server`.
set -eu

if [ -z "${PGPASSWORD:-}" ]; then
    echo "entrypoint: PGPASSWORD is empty (set POSTGRES_PASSWORD in infra/.env)" >&2
    exit 64
fi
: "${POSTGRES_USER:?set POSTGRES_USER in infra/.env}"
: "${MIROFLOW_BUCKET:?set MIROFLOW_BUCKET in infra/.env}"

exec mlflow server \
    --backend-store-uri "postgresql+psycopg2://${POSTGRES_USER}@${PGHOST:-postgres}:${PGPORT:-5432}/${PGDATABASE:-mlflow}" \
    --artifacts-destination "s3://${MIROFLOW_BUCKET}/mlflow" --serve-artifacts \
    --host 0.0.0.0 --port 5001 --workers "${MLFLOW_WORKERS:-2}" \
    "$@"
