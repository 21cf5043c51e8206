#!/bin/sh
# Container entrypoint: runs `derpd serve` with flags built from DERPD_* variables, then any
# extra arguments given to the container. A first argument that is not a flag is run as a
# command instead (for example `derpd genkey`, `stund serve` or `derpd coordinator ...`).
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

if [ -z "${DERPD_HOSTNAME:-}" ]; then
    case "${DERPD_CERTMODE:-letsencrypt}" in
        manual)
            echo "derpd-entrypoint: set DERPD_HOSTNAME to the relay's DNS name (with <name>.crt and <name>.key" \
                 "in ${DERPD_CERTDIR:-the cert dir}) or to its public IP address (a self-signed certificate is" \
                 "created and its DERP map pin printed)" >&2 ;;
        *)
            echo "derpd-entrypoint: set DERPD_HOSTNAME to the relay's DNS name (its certificate comes from" \
                 "Let's Encrypt), or to its public IP with DERPD_ACME_IP_CERTS=1 (a short-lived IP" \
                 "certificate) or with DERPD_CERTMODE=manual (self-signed, pinned)" >&2 ;;
    esac
    exit 2
fi

set -- serve -a "${DERPD_ADDR:-:443}" --http-port "${DERPD_HTTP_PORT:-80}" \
    --stun-port "${DERPD_STUN_PORT:-3478}" -c "${DERPD_KEY_FILE:-/var/lib/derpd/derper.key}" "$@"
set -- "$@" --certmode "${DERPD_CERTMODE:-letsencrypt}" --certdir "${DERPD_CERTDIR:-/var/lib/derpd/certs}"
if [ -n "${DERPD_ACME_EMAIL:-}" ]; then
    set -- "$@" --acme-email "$DERPD_ACME_EMAIL"
fi
if [ -n "${DERPD_ACME_DIRECTORY:-}" ]; then
    set -- "$@" --acme-directory "$DERPD_ACME_DIRECTORY"
fi
case "${DERPD_ACME_IP_CERTS:-0}" in
    1 | true | yes) set -- "$@" --acme-ip-certs ;;
esac
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
