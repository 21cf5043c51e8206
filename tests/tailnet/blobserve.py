"""Serves one file over TCP on 127.0.0.1:PORT to every client, then closes the connection.

Run inside the tailnet's network namespace (tailnet_harness.Tailnet.serve_file); prints
``serving`` once it listens.  Usage: blobserve.py FILE PORT [BYTES_PER_SECOND]
"""

import socket
import sys
import threading
import time

CHUNK = 64 * 1024


def send(conn: socket.socket, path: str, rate: int) -> None:
    with conn, open(path, "rb") as f:
        try:
            if not rate:
                conn.sendfile(f)
                return
            start, sent = time.monotonic(), 0
            while chunk := f.read(CHUNK):
                conn.sendall(chunk)
                sent += len(chunk)
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)  # the pace of a slow sender, not a wait for an event
        except OSError:
            pass  # the client went away


def main() -> None:
    path, port = sys.argv[1], int(sys.argv[2])
    rate = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    with socket.create_server(("127.0.0.1", port)) as srv:
        print("serving", flush=True)
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=send, args=(conn, path, rate), daemon=True).start()


if __name__ == "__main__":
    main()
