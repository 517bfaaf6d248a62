"""The import contracts of pyproject.toml hold: layers, forbidden imports, no
cycles (docs/ARCHITECTURE.md, "Layers and the import contracts").

`lint-imports` (import-linter) reads the source, not the running program, so
an import inside a function or under TYPE_CHECKING counts like any other.
It runs in a child process against this checkout's pyvmm, whatever pyvmm the
Python environment has installed.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Refuses to check another checkout's pyvmm: the contracts are this one's.
_LINT = """
import importlib.util, sys
from pathlib import Path
origin = Path(importlib.util.find_spec("pyvmm").origin).resolve()
if origin.parent != Path(sys.argv[2]).resolve() / "pyvmm":
    sys.exit(f"pyvmm is imported from {origin}, not from the checkout under test")
from importlinter.cli import lint_imports
sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))
"""


def lint_imports(config: Path) -> subprocess.CompletedProcess:
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", _LINT, str(config), str(ROOT)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_every_import_contract_is_kept():
    result = lint_imports(ROOT / "pyproject.toml")
    assert "No module named 'importlinter'" not in result.stderr, "import-linter is missing: run scripts/bootstrap"
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout, result.stdout


def test_a_broken_contract_fails_the_check(tmp_path):
    # The machine imports KVM, so this contract is broken: the check must say so.
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "pyvmm"\n\n'
        '[[tool.importlinter.contracts]]\nname = "the machine without KVM"\ntype = "forbidden"\n'
        'source_modules = ["pyvmm.machine"]\nforbidden_modules = ["pyvmm.kvm"]\n'
    )
    result = lint_imports(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and "pyvmm.machine -> pyvmm.kvm" in result.stdout, result.stdout
