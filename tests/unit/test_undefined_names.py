"""No Python file of the project uses a name it never defines: pyflakes'
undefined-name checks over pyvmm, the tests and every Python script,
including those without a .py suffix (scripts/soak, scripts/bench, ...),
which otherwise fail only when they run, often inside the testbed, minutes
into a soak or a benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest

pyflakes_api = pytest.importorskip("pyflakes.api")
from pyflakes import messages, reporter  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
UNDEFINED = (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)


def python_files() -> list[Path]:
    files = [*REPO.glob("pyvmm/**/*.py"), *REPO.glob("tests/**/*.py"), *REPO.glob("scripts/**/*.py")]
    for path in (REPO / "scripts").iterdir():
        if path.is_file() and path.suffix == "" and path.read_bytes()[:64].startswith(b"#!") \
                and b"python" in path.read_bytes().split(b"\n", 1)[0]:
            files.append(path)
    return sorted(files)


class Collect(reporter.Reporter):
    def __init__(self):
        super().__init__(None, None)
        self.found: list[str] = []

    def flake(self, message):
        if isinstance(message, UNDEFINED):
            self.found.append(str(message))

    def syntaxError(self, filename, msg, lineno, offset, text):
        self.found.append(f"{filename}:{lineno}: {msg}")

    def unexpectedError(self, filename, msg):
        self.found.append(f"{filename}: {msg}")


def test_every_python_file_defines_the_names_it_uses():
    files = python_files()
    assert any(path.name == "soak" for path in files)  # the scripts without a suffix are in
    collect = Collect()
    for path in files:
        pyflakes_api.check(path.read_text(), str(path.relative_to(REPO)), collect)
    assert collect.found == []
