#!/bin/sh
# Container entrypoint: runs `derpd serve` with flags built from DERPD_* variables, followed by
# the arguments given to the container. Those come last, so they win: derpd reads flags as Go
# does, where the last occurrence of a flag is the one used (`... --certmode manual` overrides
# DERPD_CERTMODE). A first argument that is not a flag is run as a command instead (for
# example `derpd genkey`, `stund serve` or `derpd coordinator ...`).
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

# What the arguments set themselves: a --hostname there needs no DERPD_HOSTNAME, and a -v there
# replaces DERPD_VERBOSE (-v counts, so both would add up).
certmode=${DERPD_CERTMODE:-letsencrypt}
arg_hostname=0
arg_verbose=0
prev=
for arg in "$@"; do
    case "$prev" in
        -certmode | --certmode) certmode=$arg ;;
    esac
    case "$arg" in
        --) break ;;
        -hostname | --hostname | -hostname=* | --hostname=*) arg_hostname=1 ;;
        -certmode=* | --certmode=*) certmode=${arg#*=} ;;
        -v | -vv | -vvv | -verbose | --verbose) arg_verbose=1 ;;
    esac
    prev=$arg
done

if [ -z "${DERPD_HOSTNAME:-}" ] && [ "$arg_hostname" = 0 ]; then
    case "$certmode" in
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

# The flags from the environment go after the arguments, then the arguments are rotated to the end.
nargs=$#
set -- "$@" serve -a "${DERPD_ADDR:-:443}" --http-port "${DERPD_HTTP_PORT:-80}" \
    --stun-port "${DERPD_STUN_PORT:-3478}" -c "${DERPD_KEY_FILE:-/var/lib/derpd/derper.key}"
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
if [ "$arg_verbose" = 0 ]; then
    case "${DERPD_VERBOSE:-0}" in
        0 | "") ;;
        1) set -- "$@" -v ;;
        *) set -- "$@" -vv ;;
    esac
fi
while [ "$nargs" -gt 0 ]; do
    set -- "$@" "$1"
    shift
    nargs=$((nargs - 1))
done
exec derpd "$@"
