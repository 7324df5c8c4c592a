"""Pass `read_settings`: the policy's name, target and mode, one of each."""

from __future__ import annotations

from .. import model as M
from .. import syntax as S
from ..arch import ARCHES
from ..diagnostics import Span, did_you_mean
from ..source import display_path
from .context import Checking

__all__ = ["read_settings", "SUPPORTED_XEN"]

SUPPORTED_XEN = (4, 17)


def read_settings(chk: Checking) -> None:
    """`chk.name`, `chk.span`, `chk.target`, `chk.arch` and `chk.mode`; a second target or mode is an error."""
    block = chk.root_tree.policy
    chk.name, chk.span = (block.name, block.span) if block else (chk.root.stem, Span(display_path(chk.root), 1, 1))
    targets = [u.item for u in chk.units_of(S.Target)]
    modes = [u.item for u in chk.units_of(S.Mode)]
    for dup in targets[1:]:
        chk.d.error("PC316", dup.span, "target is set twice", f"the first is at {targets[0].span}")
    for dup in modes[1:]:
        chk.d.error("PC316", dup.span, "mode is set twice", f"the first is at {modes[0].span}")
    chk.target = _target(chk, targets[0] if targets else None, chk.span)
    chk.mode = "enforce"
    if modes:
        if modes[0].mode not in ("enforce", "audit"):
            chk.d.error("PC422", modes[0].span, f"unknown mode '{modes[0].mode}'",
                        did_you_mean(modes[0].mode, ["enforce", "audit"]) or "the modes are enforce and audit")
        else:
            chk.mode = modes[0].mode


def _target(chk: Checking, t: S.Target | None, policy_span: Span) -> M.Target:
    if t is None:
        arch = chk.target_arch or "x86_64"
        chk.arch = ARCHES.get(arch, ARCHES["x86_64"])
        if chk.target_arch is None:
            chk.d.warning("PC411", policy_span, "no target given: assuming 'target xen >= 4.17 on x86_64'",
                          "say it: target xen >= 4.17 on x86_64 | x86_64-nomtf | x86_64-svm | arm64")
        return M.Target("xen", SUPPORTED_XEN, arch)
    if t.hypervisor != "xen":
        chk.d.error("PC411", t.span, f"unknown hypervisor '{t.hypervisor}'", "policyc targets xen")
    version = SUPPORTED_XEN
    if t.version is not None:
        version = tuple(int(p) for p in t.version.split("."))
        if t.op not in (">=", "=="):
            chk.d.error("PC412", t.span, f"version constraint '{t.op} {t.version}' is not supported",
                        "write: target xen >= 4.17 on ARCH")
        elif version < SUPPORTED_XEN:
            chk.d.error("PC412", t.span, f"Xen {t.version} is older than 4.17",
                        "policyc speaks the vm_event interface version 7 of Xen 4.17 and later")
    arch = chk.target_arch or t.arch
    if arch not in ARCHES:
        chk.d.error("PC411", t.span, f"unknown architecture '{arch}'",
                    did_you_mean(arch, ARCHES) or f"the targets are {', '.join(ARCHES)}")
        arch = "x86_64"
    chk.arch = ARCHES[arch]
    return M.Target("xen", version, arch)
