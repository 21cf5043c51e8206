#!/usr/bin/env python3
"""Container HEALTHCHECK: GET /derp/probe on the relay's own listener (DERPD_ADDR).

The relay serves TLS on port 443 or with a cert mode, plain HTTP otherwise; the check tries
TLS first without verifying the certificate (it only asks whether this process answers).
Exit 0 if the relay answered 200, 1 otherwise.
"""

import http.client
import os
import ssl
import sys


def main() -> int:
    addr = os.environ.get("DERPD_ADDR", ":443")
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    errors = []
    for conn in (http.client.HTTPSConnection(host, int(port), timeout=3, context=insecure),
                 http.client.HTTPConnection(host, int(port), timeout=3)):
        try:
            conn.request("GET", "/derp/probe")
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"{type(conn).__name__}: {e}")
            continue
        finally:
            conn.close()
        if status == 200:
            return 0
        errors.append(f"{type(conn).__name__}: HTTP {status}")
    print("derpd-healthcheck: " + "; ".join(errors), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
