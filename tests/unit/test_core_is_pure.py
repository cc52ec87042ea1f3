"""The cores and the wire schema do no I/O: no event loop, socket or client library imports.

An AST scan of every module (any import statement, at any depth, including
inside functions and `if TYPE_CHECKING:` blocks, and `importlib.import_module` /
`__import__` calls with a literal name), plus a check in a fresh interpreter
that importing them all pulls none of these in transitively.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE_PACKAGES = ("gateway/core", "chat/core", "roomcast/wire")
PURE_MODULES = ("roomcast/offsets.py", "roomcast/watchdog.py", "roomcast/stopping.py", "roomcast/revocation.py")  # pure modules beside adapters
FORBIDDEN = frozenset({"asyncio", "picows", "redis", "hiredis", "aiokafka", "aiosqlite", "asyncpg", "socket", "uvloop"})


def pure_modules() -> list[Path]:
    return sorted([p for package in PURE_PACKAGES for p in (ROOT / package).rglob("*.py")] + [ROOT / m for m in PURE_MODULES])


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def forbidden_imports(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, imported name) of every import of a FORBIDDEN top-level package in source."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found.extend((node.lineno, name) for name in names if name.split(".")[0] in FORBIDDEN)
    return found


def test_the_pure_packages_exist_and_have_modules():
    for package in PURE_PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), f"{package} is gone; update PURE_PACKAGES"
    for module in PURE_MODULES:
        assert (ROOT / module).is_file(), f"{module} is gone; update PURE_MODULES"
    names = {module_name(p) for p in pure_modules()}
    assert {"gateway.core.session", "gateway.core.rooms", "gateway.core.limits", "roomcast.wire.frames"} <= names


@pytest.mark.parametrize("path", pure_modules(), ids=module_name)
def test_pure_module_imports_no_io_library(path):
    found = forbidden_imports(path.read_text(encoding="utf-8"), str(path))
    assert found == [], f"{module_name(path)} imports I/O: " + ", ".join(f"line {line}: {name}" for line, name in found)


def test_importing_every_pure_module_pulls_in_no_io_library():
    names = [module_name(p) for p in pure_modules()]
    script = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


# ---- the scanner itself: it must see every form of import -----------------------


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import os, socket",
        "import redis.asyncio as r",
        "from aiokafka import AIOKafkaProducer",
        "from redis.asyncio import Redis",
        "import picows as p",
        "def f():\n    import uvloop\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from asyncpg import Pool\n",
        "try:\n    import hiredis\nexcept ImportError:\n    pass\n",
        "import importlib\nimportlib.import_module('aiosqlite')",
        "__import__('socket')",
    ],
)
def test_scanner_finds_forbidden_import(source):
    assert forbidden_imports(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "import struct, re, msgspec",
        "from dataclasses import dataclass",
        "from roomcast.wire.events import decode_event_seq",
        "from . import asyncio_free",
        "import socketserver_like_name_but_not_socket",
        "text = 'import asyncio'",
    ],
)
def test_scanner_allows_pure_imports(source):
    assert forbidden_imports(source) == []
