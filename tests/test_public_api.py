"""The curated public API: what `policyc` and `policyc.runtime` export is what their docstrings list,
and each name is the object its module defines (no second meaning under the same name)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import policyc
import policyc.runtime
from policyc import check, compiler, diagnostics, errors, lowering, plan
from policyc.runtime import backend, bind, decide, enforce
from policyc.runtime.sim import xen

POLICYC_API = {
    "__version__": policyc.version.__version__,
    "check_policy": check.check_policy,
    "compile_plan": compiler.compile_plan,
    "load_plan": plan.load_plan,
    "Diagnostic": diagnostics.Diagnostic,
    "Diagnostics": diagnostics.Diagnostics,
    "PolicycError": errors.PolicycError,
    "PlanError": plan.PlanError,
}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "policies" / "linux-kernel-integrity.vmi"
RUNTIME_API = {
    "Backend": backend.Backend,
    "bind_plan": bind.bind_plan,
    "install": importlib.import_module("policyc.runtime.install").install,
    "DecisionEngine": decide.DecisionEngine,
    "Enforcer": enforce.Enforcer,
    "SimulatedXen": xen.SimulatedXen,
}


def test_policyc_exports_exactly_its_api():
    assert sorted(policyc.__all__) == sorted(POLICYC_API)
    for name, value in POLICYC_API.items():
        assert getattr(policyc, name) is value, name


def test_policyc_runtime_exports_exactly_its_api():
    assert sorted(policyc.runtime.__all__) == sorted(RUNTIME_API)
    for name, value in RUNTIME_API.items():
        assert getattr(policyc.runtime, name) is value, name


def test_the_docstrings_list_the_exports():
    for module, api in ((policyc, POLICYC_API), (policyc.runtime, RUNTIME_API)):
        for name in api:
            if name != "__version__":
                assert f"``{name}" in module.__doc__, f"{module.__name__}'s docstring does not list {name}"


def test_star_import_gives_the_api_and_nothing_else():
    scope: dict = {}
    exec("from policyc import *", scope)
    assert set(scope) - {"__builtins__"} == set(POLICYC_API)
    scope = {}
    exec("from policyc.runtime import *", scope)
    assert set(scope) - {"__builtins__"} == set(RUNTIME_API)


def test_install_is_the_function_even_when_its_module_was_imported_first():
    # policyc.runtime.install is also a module's name; a fresh interpreter imports the module first
    code = ("import policyc.runtime.install, policyc.runtime as r, inspect; "
            "print(inspect.isfunction(r.install), r.install.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "policyc.runtime.install"]


def test_check_policy_has_one_meaning(tmp_path):
    # `policyc.check_policy` is `policyc.check.check_policy`: diagnostics in, the model (or None) out
    found = policyc.Diagnostics()
    model = policyc.check_policy(EXAMPLE, found)
    assert model is not None and model.rules and found.error_count == 0
    bad = tmp_path / "bad.vmi"
    bad.write_text(EXAMPLE.read_text() + "\nrule {\n")
    assert policyc.check_policy(bad, found) is None and found.error_count > 0
    plan_data = policyc.compile_plan(model, policyc.Diagnostics())
    assert plan_data is not None and plan_data["plan_format"] == lowering.PLAN_FORMAT


def test_importing_the_package_does_not_load_the_compiler():
    code = "import sys, policyc, policyc.runtime.backend; print(sorted(m for m in sys.modules if m in " \
           "('policyc.check', 'policyc.checking', 'policyc.compiler', 'policyc.lowering', 'policyc.runtime.enforce', 'policyc.runtime.sim.xen')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("policyc", "grammar", "runtime", "native")


def _package_inits() -> list[Path]:
    return sorted(p for folder in PACKAGE_DIRS for p in (ROOT / folder).rglob("__init__.py"))


def test_every_package_says_its_stage_and_what_it_may_import():
    inits = _package_inits()
    assert len(inits) >= 6
    for path in inits:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        lines = doc.splitlines()
        assert any(line.startswith("Stage: ") for line in lines), f"{path.relative_to(ROOT)}: no 'Stage:' line"
        assert any(line.startswith("May import: ") for line in lines), \
            f"{path.relative_to(ROOT)}: no 'May import:' line"


def test_the_readme_maps_every_package_folder():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = [line for line in readme.splitlines() if line.startswith("| `")]
    listed = {line.split("`")[1].rstrip("/") for line in table}
    folders = {str(p.parent.relative_to(ROOT)) for p in _package_inits()}
    assert folders <= listed, f"README's layout table lacks {sorted(folders - listed)}"
    assert all((ROOT / f).is_dir() for f in listed), "README's layout table names a folder that is not there"


def test_the_wheel_ships_every_package_folder():
    # pyproject.toml lists the packages by name: a package folder it misses installs without its modules.
    import tomllib
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    installed = {source: name for name, source in setuptools["package-dir"].items()}
    folders = {str(p.parent.relative_to(ROOT)) for p in _package_inits()}
    top = {f: next(src for src in installed if f == src or f.startswith(src + "/")) for f in folders}
    names = {installed[src] + f[len(src):].replace("/", ".") for f, src in top.items()}
    missing = sorted(names - set(setuptools["packages"]))
    assert missing == [], f"pyproject.toml's packages lack {missing}"
