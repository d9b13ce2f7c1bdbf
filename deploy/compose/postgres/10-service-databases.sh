#!/usr/bin/env bash
# Runs once, on the first start of the postgres:15 container (docker-entrypoint-initdb.d):
# one database and one login role per service that keeps state. Each service owns its
# database, and no other role may connect to it (services never read each other's tables).
#
# Passwords come from <SVC>_DB_PASSWORD (dev default: <svc>-dev). The same variables build
# the services' <SVC>_DATABASE_URL in docker-compose.yml.
#
# Also runnable by hand against any server as a superuser (psql's PG* variables pick the
# server); it is idempotent and keeps existing roles' passwords in step with the variables.
set -Eeuo pipefail

SERVICES=(tokens fleet commands firmware gateway)

psql_admin() {
  psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" "$@"
}

for svc in "${SERVICES[@]}"; do
  var="${svc^^}_DB_PASSWORD"
  password="${!var:-${svc}-dev}"
  echo "service database: ${svc}"
  # psql variables (:'x' literal, :"x" identifier) quote the values safely.
  psql_admin --set=name="${svc}" --set=password="${password}" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'name')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'name') \gexec
ALTER ROLE :"name" WITH LOGIN PASSWORD :'password';
SELECT format('CREATE DATABASE %I OWNER %I', :'name', :'name')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name') \gexec
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
GRANT ALL ON DATABASE :"name" TO :"name";
SQL
done
