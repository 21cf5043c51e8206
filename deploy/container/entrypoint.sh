#!/bin/sh
# Container entrypoint: runs `derpd serve` with flags built from DERPD_* variables, then any
# extra arguments given to the container. A first argument that is not a flag is run as a
# command instead (for example `derpd genkey`, `stund serve` or `derpd coordinator ...`).
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

if [ -z "${DERPD_HOSTNAME:-}" ] && [ "${DERPD_CERTMODE:-}" = "manual" ]; then
    echo "derpd-entrypoint: set DERPD_HOSTNAME to the relay's DNS name (with <name>.crt and <name>.key" \
         "in ${DERPD_CERTDIR:-the cert dir}) or to its public IP address (a self-signed certificate is" \
         "created and its DERP map pin printed)" >&2
    exit 2
fi

set -- serve -a "${DERPD_ADDR:-:443}" --http-port "${DERPD_HTTP_PORT:-80}" \
    --stun-port "${DERPD_STUN_PORT:-3478}" -c "${DERPD_KEY_FILE:-/var/lib/derpd/derper.key}" "$@"
if [ -n "${DERPD_CERTMODE:-}" ]; then
    set -- "$@" --certmode "$DERPD_CERTMODE" --certdir "${DERPD_CERTDIR:-/var/lib/derpd/certs}"
fi
if [ -n "${DERPD_HOSTNAME:-}" ]; then
    set -- "$@" --hostname "$DERPD_HOSTNAME"
fi
if [ -n "${DERPD_METRICS_ADDR:-}" ]; then
    set -- "$@" --metrics-addr "$DERPD_METRICS_ADDR"
fi
if [ -n "${DERPD_MESH_PSK_FILE:-}" ]; then
    set -- "$@" --mesh-psk-file "$DERPD_MESH_PSK_FILE"
fi
case "${DERPD_VERBOSE:-0}" in
    0 | "") ;;
    1) set -- "$@" -v ;;
    *) set -- "$@" -vv ;;
esac
exec derpd "$@"
