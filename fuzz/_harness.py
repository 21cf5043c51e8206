"""Runs one fuzz target: with atheris (coverage-guided libFuzzer) when it is installed,
otherwise with Hypothesis feeding random bytes and the seed corpus.

Usage (from the repository root)::

    python fuzz/frames.py [-max_total_time=SECONDS] [CORPUS_DIR ...]   # libFuzzer flags with atheris
    python fuzz/frames.py --hypothesis --seconds 10                    # force the fallback

A target is a function ``one_input(data: bytes)`` that raises only the parser's own
protocol error for bad input; anything else escaping is a finding (atheris writes the input
to ``crash-*``; Hypothesis prints the shrunk example).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

CORPUS_ROOT = Path(__file__).parent / "corpus"


def seeds(name: str) -> list[bytes]:
    """The seed corpus of target ``name``."""
    return [p.read_bytes() for p in sorted((CORPUS_ROOT / name).glob("*")) if p.is_file()]


def run_hypothesis(name: str, one_input: Callable[[bytes], None], seconds: float) -> int:
    """Feed the seeds, then random and mutated inputs, for ``seconds``.  Returns examples run."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    corpus = seeds(name)
    for data in corpus:
        one_input(data)
    count = len(corpus)
    mutated = st.sampled_from(corpus or [b""]).flatmap(
        lambda seed: st.tuples(st.integers(0, len(seed)), st.binary(max_size=64), st.integers(0, 8)).map(
            lambda t: seed[: t[0]] + t[1] + seed[t[0] + t[2]:]))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        @settings(max_examples=200, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.binary(max_size=2048) | mutated)
        def batch(data: bytes) -> None:
            one_input(data)

        batch()
        count += 200
    return count


def main(name: str, one_input: Callable[[bytes], None], instrument: Callable[[], None]) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--hypothesis", action="store_true")
    parser.add_argument("--seconds", type=float, default=10.0)
    args, rest = parser.parse_known_args()
    atheris = None
    if not args.hypothesis:
        try:
            import atheris  # type: ignore[import-not-found,no-redef]
        except ImportError:
            print(f"{name}: atheris is not installed (pip install atheris); using Hypothesis", file=sys.stderr)
    if atheris is None:
        n = run_hypothesis(name, one_input, args.seconds)
        print(f"{name}: {n} inputs, no finding")
        return
    # Instrument only our packages: instrumenting trio and friends takes many seconds.
    with atheris.instrument_imports(include=["derpd", "stund", "h11"]):
        instrument()
    if not any(not a.startswith("-") for a in rest):
        rest.append(str(CORPUS_ROOT / name))
    atheris.Setup([sys.argv[0], *rest], one_input)
    atheris.Fuzz()
