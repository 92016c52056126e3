#!/bin/bash
# Builds a stand-in for the official `postgres` image (no registry can be reached here) from
# Debian bookworm's PostgreSQL 15 on a debootstrapped rootfs, with the interface the compose file
# and the chart's CI values use: ENTRYPOINT docker-entrypoint.sh (.ci/postgres: POSTGRES_USER,
# POSTGRES_PASSWORD, POSTGRES_DB, PGDATA), CMD postgres, user postgres uid 70 / gid 70 as in the
# alpine image, VOLUME /var/lib/postgresql/data owned by it, pg_isready on PATH, EXPOSE 5432.
# Differences: PostgreSQL 15, not 17; a smaller entrypoint (no /docker-entrypoint-initdb.d).
#
# usage: make-postgres-image.sh [TAG]   (root, debootstrap, a running Docker engine; ~1-2 min)
set -euo pipefail
TAG="${1:-postgres:17-alpine}"
D=$(cd "$(dirname "$0")" && pwd)
R=$(mktemp -d "${TMPDIR:-/tmp}/rootfs-postgres.XXXXXX")
trap 'umount "$R/proc" 2>/dev/null || true; rm -rf --one-file-system "$R"' EXIT
debootstrap --variant=minbase bookworm "$R" http://deb.debian.org/debian >/dev/null
printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"
chmod +x "$R/usr/sbin/policy-rc.d"
# This machine's package traffic may be TLS-intercepted: trust its CAs inside the rootfs.
cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/" 2>/dev/null || true
mount -t proc proc "$R/proc"
chroot "$R" sh -ec 'groupadd -r -g 70 postgres; useradd -r -g postgres -u 70 -d /var/lib/postgresql -s /bin/sh postgres
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null
  mkdir -p /var/lib/postgresql/data /var/run/postgresql
  chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
  chmod 700 /var/lib/postgresql/data
  chmod 3777 /run/postgresql  # as the official image: a tmpfs over it takes this mode'
umount "$R/proc"
rm -f "$R/usr/sbin/policy-rc.d"
install -m 0755 "$D/postgres/docker-entrypoint.sh" "$R/usr/local/bin/docker-entrypoint.sh"
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/usr/share/doc/* "$R"/usr/share/man/*
find "$R/var/log" -type f -delete
tar -C "$R" -c . | docker import \
  -c 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV PGDATA=/var/lib/postgresql/data' -c 'ENV LANG=C.UTF-8' \
  -c 'VOLUME /var/lib/postgresql/data' -c 'USER postgres' -c 'EXPOSE 5432' \
  -c 'ENTRYPOINT ["docker-entrypoint.sh"]' -c 'CMD ["postgres"]' - "$TAG" >/dev/null
docker image inspect -f '{{.Size}}' "$TAG" | awk -v t="$TAG" '{printf "%s built (%.0f MB)\n", t, $1/1e6}'
