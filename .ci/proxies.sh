#!/usr/bin/env bash
# For `make test` only: nginx and HAProxy, whose snippets in deploy/ tests/server/test_deploy.py runs
# in front of the server. Only their binaries are used, so installing them must neither start nor
# enable their system services (Debian's nginx would otherwise listen on port 80 of every address).
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
need=()
for tool in nginx haproxy; do
    have "$tool" || need+=("$tool")
done
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: ${need[*]} missing: the tests of deploy/'s proxy snippets will skip (fail under" \
        "CI=true); install as root: apt-get install ${need[*]}" >&2
    exit 0
fi
echo "bootstrap: installing ${need[*]} for the proxy tests (their services are not started or enabled)"
if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Debian's maintainer scripts ask this file before starting a service; 101 means "not now".
    printf '#!/bin/sh\n# vaultfs bootstrap: start no service while packages install\nexit 101\n' \
        >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
if [ -d /run/systemd/system ]; then
    for tool in "${need[@]}"; do
        systemctl disable --now "$tool" >/dev/null 2>&1 || true
    done
fi
