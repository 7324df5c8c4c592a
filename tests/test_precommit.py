"""The pre-commit hooks of .pre-commit-hooks.yaml, run the way a user tries them: `pre-commit try-repo`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "policies"


def test_hooks_file_declares_check_and_fmt():
    hooks = {h["id"]: h for h in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())}
    assert set(hooks) == {"policyc-check", "policyc-fmt"}
    assert hooks["policyc-check"]["entry"].startswith("policyc check")
    assert hooks["policyc-fmt"]["entry"] == "policyc fmt --check"
    assert all(h["language"] == "python" for h in hooks.values())


def _try_repo_preconditions() -> str | None:
    """Why try-repo cannot run here, or None."""
    if shutil.which("git") is None:
        return "git is not installed"
    try:
        import pre_commit  # noqa: F401
    except ImportError:
        return "pre-commit is not installed (pip install 'policyc[test]')"
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--error-unmatch", ".pre-commit-hooks.yaml"],
                             capture_output=True)
    if tracked.returncode != 0:
        # try-repo copies the tracked files of a checkout (with their uncommitted changes) only.
        return "the source tree is not a git checkout with .pre-commit-hooks.yaml tracked"
    return None


@pytest.fixture(scope="module")
def try_repo(tmp_path_factory):
    reason = _try_repo_preconditions()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("hooks")
    repo = work / "repo"
    repo.mkdir()
    env = {**os.environ, "PRE_COMMIT_HOME": str(work / "cache"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q", "."], cwd=repo, check=True, env=env)
    for f in EXAMPLES.iterdir():
        if f.is_file():                           # reload/: the plans a scenario reloads
            shutil.copy(f, repo / f.name)

    def run(*args: str, files: list[str]) -> subprocess.CompletedProcess:
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
        return subprocess.run([sys.executable, "-m", "pre_commit", "try-repo", str(ROOT), *args, "--files", *files],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=1200)

    run.repo = repo
    return run


def test_try_repo_check_passes_on_the_examples(try_repo):
    files = sorted(p.name for p in try_repo.repo.glob("*.vmi"))
    result = try_repo("policyc-check", files=files)
    if result.returncode != 0 and "Installing environment" in result.stdout and "policyc check..." not in result.stdout:
        pytest.skip(f"pre-commit could not build the hook's environment (no package index?):\n{result.stdout[-2000:]}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "policyc check" in result.stdout and "Passed" in result.stdout


def test_try_repo_hooks_fail_on_a_broken_and_a_misformatted_policy(try_repo):
    broken = (EXAMPLES / "linux-kernel-integrity.vmi").read_text().replace("sys_call_table", "sys_cal_table")
    (try_repo.repo / "broken.vmi").write_text(broken)
    misformatted = (EXAMPLES / "linux-syscall-tracing.vmi").read_text().replace("    mode audit", "  mode   audit")
    (try_repo.repo / "misformatted.vmi").write_text(misformatted)
    result = try_repo(files=["broken.vmi", "misformatted.vmi"])  # every hook of the repository
    if "policyc check..." not in result.stdout:
        pytest.skip(f"pre-commit could not build the hook's environment (no package index?):\n{result.stdout[-2000:]}")
    assert result.returncode == 1
    check, fmt = result.stdout.split("policyc fmt")
    assert "Failed" in check and "PC302" in check and "did you mean 'sys_call_table'" in check
    assert "Failed" in fmt and "misformatted.vmi: would reformat" in fmt and "broken.vmi" not in fmt


def test_examples_pass_what_the_hooks_run_and_directory_searches_pass_over_scenarios(capsys):
    from policyc.cli import main

    examples = str(ROOT / "examples")
    assert main(["fmt", "--check", examples]) == 0, capsys.readouterr().out
    assert main(["check", "--quiet", examples]) == 0
    capsys.readouterr()
    assert main(["check", examples]) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["check", str(ROOT / "examples" / "policies")]) == 0
    assert summary == capsys.readouterr().err.strip().splitlines()[-1]  # the scenarios were not read as policies
    assert ": 0 errors" in summary
    # A scenario named on the command line is still read, as the user asked: it is no policy.
    assert main(["check", "--quiet", str(ROOT / "examples" / "scenarios" / "linux-syscall-tracing.yaml")]) == 1
