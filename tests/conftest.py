"""Shared fixtures.  Servers start on 127.0.0.1 port 0; every I/O test runs under trio.fail_after."""
