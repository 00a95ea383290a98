-- Run once by the postgres image on an empty data directory (mounted at /docker-entrypoint-initdb.d/),
-- as $POSTGRES_USER connected to $POSTGRES_DB (= mlflow, MLflow's backend store). Creates the second
-- database, for the Prefect server (PREFECT_API_DATABASE_CONNECTION_URL .../prefect), owned by the
-- same user. tests/infra/test_stack_processes.py runs this file against a real PostgreSQL 15.
CREATE DATABASE prefect;
