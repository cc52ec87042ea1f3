"""What every fuzz harness shares: the target list, a byte consumer, and the
atheris entry point one target runs under (in its own process).

A harness module (``tests/fuzz/<target>.py``) defines ``check(data: bytes)``:
it drives the code under test with ``data`` and raises (AssertionError, or
whatever the code let escape) when a property does not hold. The same
function is called by atheris here and by the corpus replay test
(``tests/unit/test_fuzz_corpus.py``), which needs no atheris.

Run one target by hand (libFuzzer flags after the corpus directories)::

    python -m tests.fuzz.common session /tmp/out tests/fuzz/corpus/session -runs=1000
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

__all__ = ["TARGETS", "CORPUS_DIR", "FuzzBytes", "load_check"]

# One harness module per target, named as the target.
TARGETS = ("frame_assembler", "session", "ingest_decoder", "resp_reader")

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

# Instrumented for coverage: the project's own Python code and the harness.
# msgspec and hiredis are C, so their branches are not seen by the fuzzer.
_INSTRUMENTED = ["roomcast", "gateway", "tests.fuzz"]


class FuzzBytes:
    """Reads a fuzz input front to back; past the end every read gives zeros
    or nothing, so any input, however short, is a valid script."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def u8(self) -> int:
        if self._pos >= len(self._data):
            return 0
        self._pos += 1
        return self._data[self._pos - 1]

    def u16(self) -> int:
        return (self.u8() << 8) | self.u8()

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def take(self, count: int) -> bytes:
        chunk = self._data[self._pos : self._pos + count]
        self._pos += len(chunk)
        return chunk

    def rest(self) -> bytes:
        return self.take(self.remaining)


def _harness(target: str) -> ModuleType:
    if target not in TARGETS:
        raise SystemExit(f"unknown fuzz target {target!r}; one of {', '.join(TARGETS)}")
    return importlib.import_module(f"tests.fuzz.{target}")


def load_check(target: str) -> Callable[[bytes], None]:
    """The property check of a target, uninstrumented (for the corpus replay)."""
    return _harness(target).check  # type: ignore[no-any-return]


def _fuzz(target: str, libfuzzer_argv: list[str]) -> None:
    import atheris

    # Instrument before the harness imports the code under test; modules
    # imported earlier (this one) stay uninstrumented.
    with atheris.instrument_imports(include=_INSTRUMENTED):
        check = _harness(target).check
    atheris.Setup([sys.argv[0], *libfuzzer_argv], check)
    atheris.Fuzz()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m tests.fuzz.common TARGET [corpus dirs] [libFuzzer flags]")
    _fuzz(sys.argv[1], sys.argv[2:])
