"""Coverage-guided fuzzing (atheris) of the parsers of untrusted input.

One harness module per target, each with ``check(data: bytes)``, the
property check; ``common`` holds what they share and the atheris entry
point; ``python -m tests.fuzz`` runs them (see ``__main__``). Seed inputs:
``corpus/<target>/``. README.md, "Fuzzing", says how to run a long run.
"""
