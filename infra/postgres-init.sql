-- Runs once, on an empty data volume: Prefect uses the default database (POSTGRES_DB=prefect), MLflow its own.
CREATE DATABASE mlflow;
