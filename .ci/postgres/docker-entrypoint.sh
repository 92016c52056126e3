#!/bin/sh
# The official postgres image's interface, for the stand-in: POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB and PGDATA make the first start initialise a database; a first argument `postgres`
# (the default) or one starting with `-` runs the server. Runs as whoever starts it (uid 70).
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
export PGDATA
if [ "${1:-postgres}" = postgres ] || [ "${1#-}" != "${1:-}" ]; then
  [ "${1:-}" = postgres ] && shift
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
    user=${POSTGRES_USER:-postgres}
    pwfile=$(mktemp)
    printf '%s' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --username="$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    pg_ctl -o "-c listen_addresses=''" -w start >/dev/null
    if [ "${POSTGRES_DB:-$user}" != postgres ]; then
      createdb --username="$user" "${POSTGRES_DB:-$user}"
    fi
    pg_ctl -m fast -w stop >/dev/null
    echo "database initialised in $PGDATA"
  fi
  exec postgres -c listen_addresses='*' "$@"
fi
exec "$@"
