"""Serves one file over TCP on 127.0.0.1:PORT to every client, then closes the connection.

Run inside the tailnet's network namespace (tailnet_harness.Tailnet.serve_file); prints
``serving`` once it listens.  Usage: blobserve.py FILE PORT
"""

import socket
import sys
import threading


def send(conn: socket.socket, path: str) -> None:
    with conn, open(path, "rb") as f:
        try:
            conn.sendfile(f)
        except OSError:
            pass  # the client went away


def main() -> None:
    path, port = sys.argv[1], int(sys.argv[2])
    with socket.create_server(("127.0.0.1", port)) as srv:
        print("serving", flush=True)
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=send, args=(conn, path), daemon=True).start()


if __name__ == "__main__":
    main()
