"""Every exception the runtime and the plan loader raise has one root, `policyc.errors.PolicycError`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import policyc
import policyc.runtime
from policyc.errors import PolicycError
from policyc.plan import PlanError, load_plan
from policyc.runtime.backend import BackendError

# The loaders and the runtime: every module of policyc.runtime and policyc.native, and the modules of
# policyc that read files a user hands the runtime (plans, bundles, symbol files, policies to format).
LOADERS = ("policyc.plan", "policyc.bundle", "policyc.symbols", "policyc.fmt", "policyc.output_writer")


def _modules() -> list[str]:
    names = list(LOADERS)
    for package in ("policyc.runtime", "policyc.native"):
        pkg = importlib.import_module(package)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")
                  if not m.name.rsplit(".", 1)[-1].startswith("_")]
    return names


def _exception_classes() -> list[tuple[str, type]]:
    out = []
    for name in _modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == name
                    and not attr.startswith("_")):
                out.append((f"{name}.{attr}", value))
    return out


def test_the_runtime_defines_its_errors():
    names = {n for n, _ in _exception_classes()}
    # the walk finds them (a walk that found nothing would pass the next test vacuously)
    assert {"policyc.plan.PlanError", "policyc.runtime.backend.BackendError",
            "policyc.runtime.install.InstallError", "policyc.runtime.guest_kernel.BindError",
            "policyc.runtime.enforce.EnforcerError", "policyc.native.abi.RingError"} <= names


@pytest.mark.parametrize("name,cls", _exception_classes(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_public_error_is_a_policyc_error(name, cls):
    assert issubclass(cls, PolicycError), f"{name} does not derive from policyc.errors.PolicycError"


def test_errors_keep_their_builtin_kinds():
    # existing `except OSError` / `except RuntimeError` clauses keep catching them
    from policyc.runtime.output_file import OutputError
    assert issubclass(BackendError, RuntimeError) and issubclass(OutputError, OSError)


def test_a_bad_plan_is_caught_as_a_policyc_error(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PolicycError) as info:
        load_plan(path)
    assert isinstance(info.value, PlanError) and "is not JSON" in str(info.value)


def test_the_cli_reports_an_escaped_policyc_error_without_a_traceback(monkeypatch, capsys):
    from policyc import cli, plan

    def fails():
        raise BackendError("set_access", "gfn 0x10 is not populated", 22)
    monkeypatch.setattr(plan, "plan_schema", fails)      # what `schema --plan` prints, failing
    assert cli.main(["schema", "--plan"]) == cli.EXIT_PROBLEMS
    err = capsys.readouterr().err
    assert err == "policyc schema: error: set_access: gfn 0x10 is not populated\n"
