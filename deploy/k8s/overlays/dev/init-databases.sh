#!/bin/bash
# Creates the stack's databases (MLflow, Prefect, model service, Label Studio), owned by
# POSTGRES_USER.
# The official postgres image runs /docker-entrypoint-initdb.d/* once, on an empty data volume;
# docker-compose.yml passes the names from .env. Names are quoted as identifiers (%I).
set -euo pipefail

for db in "$POSTGRES_MLFLOW_DB" "$POSTGRES_PREFECT_DB" "$POSTGRES_SERVICE_DB" "$POSTGRES_LABEL_STUDIO_DB"; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -v db="$db" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'db', current_user)
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\gexec
SQL
done
