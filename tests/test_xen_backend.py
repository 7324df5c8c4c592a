"""The libxenctrl backend (runtime/xen_backend.py) without a Xen host.

What runs anywhere: the declarations against Debian's libxen-dev headers (a C file of
_Static_asserts compiled with gcc, then run to print every offset and constant the module
hard-codes), dlopen of the libraries, the refusals on a host that is not a Xen dom0, the
access-name and capability-bit tables, the hvm_hw_cpu register mapping, and the ring bookkeeping
over a private ring page. What needs a Xen dom0 (attach, hypercalls) is skipped with the reason.
"""

from __future__ import annotations

import ctypes.util
import errno
import io
import os
import shutil
import struct
import subprocess
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from policyc.cli import main
from policyc.native import abi
from policyc.runtime import xen_arm64 as xa
from policyc.runtime import xen_backend as xb
from policyc.runtime import xen_libs as xl
from policyc.runtime.backend import ACCESS_VALUES, BackendError, InvalidArgument, Unsupported

ROOT = Path(__file__).resolve().parent.parent
KERNEL_INTEGRITY = ROOT / "examples" / "policies" / "linux-kernel-integrity.vmi"
HEADERS = ("xenctrl.h", "xenevtchn.h", "xenforeignmemory.h", "xendevicemodel.h", "xenstore.h")
INCLUDE = Path("/usr/include")
# The headers of each release the backend supports: the system's libxen-dev (Debian 12: 4.17), and
# Debian 13's libxen-dev 4.20 unpacked where POLICYC_XEN_HEADERS_4_20 points (.ci/run fetches it).
HEADER_SETS = {"system": INCLUDE, "4.20": os.environ.get("POLICYC_XEN_HEADERS_4_20")}


def _skip(reason: str) -> None:
    print(f"SKIP: {reason}")          # shown with -rs / -s; the skip reason says it too
    pytest.skip(reason)


# =========================================================================== the headers

def _c_type(ret: str, params: str) -> str:
    """A function-pointer type for __builtin_types_compatible_p."""
    return f"{ret} (*)({params})"


def _checker_source(release: xl.XenRelease = xl.RELEASES[0]) -> str:
    lines = ["#include <stdbool.h>", "#include <stddef.h>", "#include <stdint.h>", "#include <stdio.h>",
             "#include <stdlib.h>", "#include <sys/mman.h>"]
    lines += [f"#include <{h}>" for h in HEADERS]
    lines += ["#include <xen/vm_event.h>", "#include <xen/hvm/save.h>", "#include <xen/domctl.h>",
              "#include <xen/sysctl.h>", ""]
    # every prototype the module declares, exactly as it declares it
    for decls in xl.DECLARATIONS.values():
        for ret, name, params in decls:
            lines.append(f'_Static_assert(__builtin_types_compatible_p(__typeof__(&{name}), '
                         f'{_c_type(ret, params)}), "declaration of {name} differs from the header");')
    # the typedefs the module spells itself
    for ours, theirs in (("unsigned long", "xen_pfn_t"), ("uint16_t", "domid_t"), ("uint32_t", "evtchn_port_t"),
                         ("int", "xenevtchn_port_or_error_t"), ("uint32_t", "xs_transaction_t")):
        lines.append(f'_Static_assert(__builtin_types_compatible_p({ours}, {theirs}), "{theirs} is not {ours}");')
    lines.append('_Static_assert(sizeof(xenmem_access_t) == 4, "xenmem_access_t is not 4 bytes");')
    lines += ["int main(void) {"]
    for struct_name, fields in xl.STRUCTS.items():
        lines.append(f'  printf("sizeof {struct_name} %zu\\n", sizeof({struct_name}));')
        for field, _decl in fields:
            lines.append(f'  printf("offsetof {struct_name}.{field} %zu\\n", offsetof({struct_name}, {field}));')
    lines.append('  printf("sizeof struct_hvm_hw_cpu %zu\\n", sizeof(struct hvm_hw_cpu));')
    for field in xl.HVM_HW_CPU_FIELDS:
        lines.append(f'  printf("hvm_hw_cpu {field} %zu %zu\\n", offsetof(struct hvm_hw_cpu, {field}), '
                     f'sizeof(((struct hvm_hw_cpu *)0)->{field}));')
    for expr in xl.CONSTANTS:
        lines.append(f'  printf("const {expr.replace(" ", "")} %llu\\n", (unsigned long long)({expr}));')
    for name in xl.MONITOR_EVENT_BITS:
        lines.append(f'  printf("const {name} %llu\\n", (unsigned long long)({name}));')
    for value in release.access_order:
        lines.append(f'  printf("const XENMEM_access_{value} %llu\\n", (unsigned long long)(XENMEM_access_{value}));')
    lines.append('  printf("const XEN_DOMCTL_INTERFACE_VERSION %llu\\n", '
                 '(unsigned long long)XEN_DOMCTL_INTERFACE_VERSION);')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


def _release_of(include: Path) -> xl.XenRelease:
    """The release whose headers these are, by domctl.h's interface version."""
    import re

    m = re.search(r"#define XEN_DOMCTL_INTERFACE_VERSION\s+(0x[0-9a-fA-F]+)", (include / "xen" / "domctl.h").read_text())
    version = int(m[1], 16) if m else None
    for r in xl.RELEASES:
        if r.domctl_interface == version:
            return r
    raise AssertionError(f"{include}: headers of a Xen release the backend does not know (domctl {version})")


@pytest.fixture(scope="module", params=sorted(HEADER_SETS))
def header_facts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    gcc = shutil.which("gcc")
    if gcc is None:
        _skip("gcc is not installed: the header check compiles C against libxen-dev")
    include = HEADER_SETS[request.param]
    if include is None:
        _skip(f"no Xen {request.param} headers: set POLICYC_XEN_HEADERS_4_20 to Debian 13's libxen-dev "
              "include directory (.ci/run fetches it)")
    include = Path(include)
    missing = [h for h in HEADERS if not (include / h).is_file()]
    if missing:
        _skip(f"libxen-dev headers are not installed (missing {', '.join(missing)} in {include})")
    release = _release_of(include)
    work = tmp_path_factory.mktemp("xenhdr")
    src, exe = work / "check.c", work / "check"
    src.write_text(_checker_source(release))
    build = subprocess.run([gcc, "-std=gnu11", "-Wall", "-Werror=implicit-function-declaration",
                            f"-I{include}", "-o", str(exe), str(src)], capture_output=True, text=True)
    # A failing _Static_assert names the declaration that drifted from the headers.
    assert build.returncode == 0, f"the declarations do not match the Xen {release.version} headers:\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    facts: dict = {"release": release}
    for line in run.stdout.splitlines():
        kind, key, *values = line.split()
        facts[f"{kind} {key}"] = int(values[0]) if len(values) == 1 else tuple(int(v) for v in values)
    return facts


def test_every_declared_prototype_matches_the_headers(header_facts):
    # The compile above is the check (one _Static_assert per function); here: it covered them all.
    declared = sum(len(d) for d in xl.DECLARATIONS.values())
    assert declared >= 60 and header_facts      # the program ran, so every assertion held


def test_struct_layouts_match_the_headers(header_facts):
    ffi = xl.xen_ffi()
    for struct_name, fields in xl.STRUCTS.items():
        assert ffi.sizeof(struct_name) == header_facts[f"sizeof {struct_name}"], struct_name
        for field, _decl in fields:
            assert ffi.offsetof(struct_name, field) == header_facts[f"offsetof {struct_name}.{field}"], \
                f"{struct_name}.{field}"


def test_hvm_hw_cpu_layout_matches_the_header(header_facts):
    assert xl.HVM_HW_CPU_SIZE == header_facts["sizeof struct_hvm_hw_cpu"]
    for field, (off, size) in xl.HVM_HW_CPU_FIELDS.items():
        assert (off, size) == header_facts[f"hvm_hw_cpu {field}"], field


def test_hard_coded_constants_match_the_headers(header_facts):
    for expr, value in xl.CONSTANTS.items():
        assert header_facts[f"const {expr.replace(' ', '')}"] == value, expr


def test_capability_bits_match_the_headers(header_facts):
    for name, (bit, _monitor) in xl.MONITOR_EVENT_BITS.items():
        assert header_facts[f"const {name}"] == bit, name


def test_access_names_follow_the_xenmem_access_enum(header_facts):
    release = header_facts["release"]
    for i, value in enumerate(release.access_order):
        assert header_facts[f"const XENMEM_access_{value}"] == i, value
        if value in ACCESS_VALUES:
            assert xl.access_code(value, release=release) == i and xl.access_name(i, release=release) == value
    assert set(ACCESS_VALUES) <= set(release.access_order)


def test_the_raw_domctl_speaks_the_headers_interface_version(header_facts):
    assert header_facts["const XEN_DOMCTL_INTERFACE_VERSION"] == header_facts["release"].domctl_interface


def test_xen_4_20_moved_default_past_r_pw():
    # Debian 13's Xen inserted XENMEM_access_r_pw before default: "default" is 11 there, and a 10
    # read back is r_pw, which policyc never sets (refused, not taken for "default")
    new = xl.RELEASES[1]
    assert new.version == "4.20"
    assert xl.access_code("default", release=new) == 11 and xl.access_code("default") == 10
    with pytest.raises(BackendError, match="r_pw"):
        xl.access_name(10, release=new)


# =========================================================================== the libraries

@pytest.mark.parametrize("key", sorted(xl.LIBRARIES))
def test_the_library_loads_and_exports_every_declared_function(key):
    soname = xl.LIBRARIES[key]
    if ctypes.util.find_library(key) is None and not any(
            (Path(d) / soname).exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib", "/usr/lib64")):
        _skip(f"{soname} is not installed (Debian: libxenmisc4.17 and friends)")
    lib = xl.load_library(key)
    for _ret, name, _params in xl.DECLARATIONS[key]:
        assert getattr(lib, name) is not None, f"{soname} does not export {name}"


# =========================================================================== not a Xen dom0

def test_a_host_without_privcmd_is_refused_in_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(xb, "PRIVCMD", str(tmp_path / "no-privcmd"))
    try:
        xl.load_library("xenctrl")
    except xl.XenUnavailable as exc:            # no libxenctrl: refused earlier, same message shape
        assert exc.message.startswith("not a Xen dom0 (or no privcmd): ")
        return
    with pytest.raises(xl.XenUnavailable) as info:
        xb.XenBackend.open("1")
    assert info.value.message.startswith("not a Xen dom0 (or no privcmd): ")
    assert "privcmd" in info.value.message and info.value.errno == errno.ENOENT


def test_a_missing_library_is_refused_naming_it(monkeypatch):
    monkeypatch.setitem(xl.LIBRARIES, "xenctrl", "libxenctrl.so.0.no-such-version")
    monkeypatch.setattr(xl, "RELEASES", (xl.XenRelease("0.0", "libxenctrl.so.0.no-such-version", 0, ()),))
    xl.forget_loaded_libraries()
    with pytest.raises(xl.XenUnavailable) as info:
        xb.XenBackend.open("1")
    assert info.value.message.startswith("not a Xen dom0 (or no privcmd): ")
    assert "libxenctrl.so.0.no-such-version" in info.value.message


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_run_on_a_host_without_xen_exits_2_with_one_line():
    if os.path.exists("/dev/xen/privcmd"):
        _skip("this host has /dev/xen/privcmd: the refusal cannot be observed")
    code, _out, err = _cli("run", str(KERNEL_INTEGRITY), "--guest", "xen:1")
    assert code == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert err.startswith("policyc run: --guest xen:1: not a Xen dom0 (or no privcmd): ")


def test_recover_on_a_host_without_xen_exits_2_with_one_line():
    if os.path.exists("/dev/xen/privcmd"):
        _skip("this host has /dev/xen/privcmd: the refusal cannot be observed")
    code, _out, err = _cli("recover", "--guest", "xen:guest1")
    assert code == 2 and err.strip().count("\n") == 0 and "not a Xen dom0" in err


# =========================================================================== pure mappings

def test_unknown_access_names_are_invalid_arguments():
    with pytest.raises(InvalidArgument) as info:
        xl.access_code("rwxz")
    assert info.value.errno == errno.EINVAL and "rwxz" in info.value.message
    with pytest.raises(BackendError):
        xl.access_name(11)


def test_capability_bitmaps_decode_to_the_simulators_monitor_names():
    # 0x1f7b is what Xen 4.17.7 reported under both emulators in the lab (NOTES.md): no singlestep
    # (bit 2, no MTF) and no privileged_call (bit 7, ARM only); bits 8, 10-12 have no Backend monitor.
    assert xl.monitors_from_capabilities(0x1F7B) == {
        "write_ctrlreg", "mov_to_msr", "software_breakpoint", "guest_request", "debug_exception", "cpuid",
        "descriptor_access"}
    assert xl.monitors_from_capabilities(1 << 2) == {"singlestep"}
    assert xl.monitors_from_capabilities(1 << 8 | 1 << 10 | 1 << 11 | 1 << 12 | 1 << 13) == frozenset()


def test_vendor_picks_the_backend_arch(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert xl.arch_from_vendor(xl.cpu_vendor(str(info))) == "x86_64-svm"
    assert xl.arch_from_vendor("GenuineIntel") == "x86_64"
    with pytest.raises(BackendError):
        xl.arch_from_vendor("")


def _hvm_cpu(**values: int) -> bytearray:
    blob = bytearray(xl.HVM_HW_CPU_SIZE)
    for field, value in values.items():
        off, size = xl.HVM_HW_CPU_FIELDS[field]
        blob[off:off + size] = value.to_bytes(size, "little")
    return blob


def test_registers_come_from_the_right_hvm_hw_cpu_fields():
    # every field gets a distinct value, so a swapped offset shows
    values = {f: 0x1000 + i for i, f in enumerate(xl.HVM_HW_CPU_FIELDS) if f != "fpu_regs"}
    values["cs_sel"] = 0xABCD0010            # only the low 16 bits are a selector
    values["ss_arbytes"] = 0xC93 | 3 << 5    # DPL 3 in the VMX access-rights format
    regs = xl.registers_from_hvm_cpu(bytes(_hvm_cpu(**values)))
    assert regs["rip"] == values["rip"] and regs["cr3"] == values["cr3"] and regs["r15"] == values["r15"]
    assert regs["msr_lstar"] == values["msr_lstar"] and regs["idtr_base"] == values["idtr_base"]
    assert regs["idtr_limit"] == values["idtr_limit"] and regs["shadow_gs"] == values["shadow_gs"]
    assert regs["fs_base"] == values["fs_base"] and regs["sysenter_eip"] == values["sysenter_eip"]
    assert regs["cs_sel"] == 0x0010 and regs["tr_sel"] == values["tr_sel"] and regs["cpl"] == 3
    for name, field in xl._REG_FIELDS.items():
        expected = values[field] & (0xFFFF if name.endswith("_sel") else (1 << 64) - 1)
        assert regs[name] == expected, name


def test_register_names_are_the_simulators():
    from policyc.runtime.sim.guest import Guest
    from policyc.runtime.sim.xen import SimulatedXen

    sim = SimulatedXen(Guest(1 << 20, vcpus=1), "x86_64")
    ours = set(xl.registers_from_hvm_cpu(bytes(xl.HVM_HW_CPU_SIZE)))
    # xcr0 lives in the CPU_XSAVE record, read separately by get_registers when Xen gives it
    assert ours | {"xcr0"} == set(sim.get_registers(0))


def test_set_registers_patches_only_the_named_fields_and_refuses_others():
    blob = bytes(_hvm_cpu(rip=0x1000, rax=7, cr3=0x5000))
    patched = xl.patch_hvm_cpu(blob, {"rip": 0x1003, "rax": 9})
    regs = xl.registers_from_hvm_cpu(patched)
    assert (regs["rip"], regs["rax"], regs["cr3"]) == (0x1003, 9, 0x5000)
    assert xl.patch_hvm_cpu(blob, {"pc": 0x2000})[xl.HVM_HW_CPU_FIELDS["rip"][0]:][:8] == (0x2000).to_bytes(8, "little")
    for name in ("cpl", "xcr0", "nonsense"):
        with pytest.raises(InvalidArgument):
            xl.patch_hvm_cpu(blob, {name: 1})


def _record(code: int, instance: int, data: bytes) -> bytes:
    return struct.pack("<HHI", code, instance, len(data)) + data


def test_the_context_loaded_back_holds_header_the_patched_cpu_record_and_end():
    header = _record(1, 0, b"H" * 24)
    cpu0 = _record(2, 0, bytes(_hvm_cpu(rip=0x10)))
    cpu1 = _record(2, 1, bytes(_hvm_cpu(rip=0x20)))
    other = _record(5, 0, b"P" * 16)
    blob = xl.build_cpu_context(header + cpu0 + other + cpu1 + _record(0, 0, b""), 1, {"rip": 0x21})
    assert blob.startswith(header) and blob.endswith(bytes(8))
    body = blob[len(header):-8]
    assert body[:8] == cpu1[:8] and xl.registers_from_hvm_cpu(body[8:])["rip"] == 0x21
    with pytest.raises(BackendError):
        xl.build_cpu_context(header + cpu0 + _record(0, 0, b""), 3, {"rip": 1})


# =========================================================================== the ring bookkeeping

def _ring_only_backend(**kw) -> xb.XenBackend:
    """A XenBackend with a private ring and no Xen: enough for the ring methods that need no hypercall."""
    return xb.XenBackend.detached(ring=abi.Ring(), **kw)


def test_sync_requests_are_tracked_until_answered():
    b = _ring_only_backend()
    ring = b.native_ring()
    paused = abi.Flag.VCPU_PAUSED
    ring.put_requests([abi.make_request(abi.Reason.MEM_ACCESS, 1, flags=paused),
                       abi.make_request(abi.Reason.GUEST_REQUEST, 2)])        # async: vCPU 2 runs on
    ring.push_requests()
    reqs = b.take_requests(8)
    assert len(reqs) == 2 and b.sync_outstanding() == {1: 1}
    b.put_responses([abi.make_response(r).raw for r in reqs])
    assert b.sync_outstanding() == {}
    assert [r.vcpu_id for r in ring.take_responses()] == [1, 2]


def test_bare_unpause_responses_on_a_quiet_ring_are_accepted():
    # recover's XEN-SEMANTICS §7 step 5: responses that answer nothing, right after a fresh enable
    b = _ring_only_backend()
    bare = [struct.pack("<IIIIH", abi.VERSION, int(abi.Flag.VCPU_PAUSED), 0, v, 0).ljust(abi.EVENT_SIZE, b"\0")
            for v in range(3)]
    b.put_responses(bare)
    assert [r.vcpu_id for r in b.native_ring().take_responses()] == [0, 1, 2]
    with pytest.raises(BackendError) as info:
        b.put_responses(bare * 3)                # more than a ring's worth
    assert info.value.errno == errno.EINVAL


class _VcpuStillRunning:
    """libxenctrl's xc_vcpu_getinfo for a vCPU that stays on its pCPU for `calls` more queries: what
    the vCPU that raised a CR/MSR write event looks like inside Xen's early-DENY gap."""

    def __init__(self, calls: int) -> None:
        self.calls, self.asked = calls, 0

    def xc_vcpu_getinfo(self, xch, domid, vcpu, info) -> int:
        self.asked += 1
        info.vcpu, info.running = vcpu, int(self.asked <= self.calls)
        return 0


def _deny_backend(running_for: int) -> tuple[xb.XenBackend, _VcpuStillRunning]:
    xc = _VcpuStillRunning(running_for)
    return _ring_only_backend(domid=7, libraries={"xenctrl": xc}, handles={"xch": None}), xc


def _answer(b: xb.XenBackend, reason: int, flags: int) -> list:
    ring = b.native_ring()
    ring.put_requests([abi.make_request(reason, 1, flags=abi.Flag.VCPU_PAUSED)])
    ring.push_requests()
    (raw,) = b.take_requests(8)
    b.put_responses([abi.make_response(abi.parse_request(raw), flags=flags).raw])
    return ring.take_responses()


@pytest.mark.parametrize("reason", [abi.Reason.WRITE_CTRLREG, abi.Reason.MOV_TO_MSR])
def test_a_register_write_deny_waits_until_its_vcpu_left_its_pcpu(reason):
    b, xc = _deny_backend(running_for=3)
    (rsp,) = _answer(b, reason, abi.Flag.VCPU_PAUSED | abi.Flag.DENY)
    assert rsp.flags & abi.Flag.DENY
    assert xc.asked == 4                       # asked until the vCPU was off, then sent
    assert b.deny_holds["checked"] == 1 and b.deny_holds["held"] == 1 and b.deny_holds["unconfirmed"] == 0


def test_other_answers_are_not_held():
    b, xc = _deny_backend(running_for=10**6)
    _answer(b, abi.Reason.WRITE_CTRLREG, abi.Flag.VCPU_PAUSED)                    # allow
    _answer(b, abi.Reason.MEM_ACCESS, abi.Flag.VCPU_PAUSED | abi.Flag.EMULATE)    # no early-DENY gap there
    assert xc.asked == 0 and b.deny_holds["checked"] == 0


def test_a_vcpu_that_never_leaves_its_pcpu_gets_its_answer_anyway(monkeypatch):
    monkeypatch.setattr(xb.XenBackend, "DENY_HOLD_LIMIT", 0.01)
    b, _xc = _deny_backend(running_for=10**6)
    (rsp,) = _answer(b, abi.Reason.MOV_TO_MSR, abi.Flag.VCPU_PAUSED | abi.Flag.DENY)
    assert rsp.flags & abi.Flag.DENY and b.deny_holds["unconfirmed"] == 1


class _ForeignMemoryWithHoles:
    """libxenforeignmemory's batch map over a physmap with holes: a hole's entry in the per-page
    error array is -EINVAL, as privcmd reports it; the map itself succeeds."""

    def __init__(self, ffi, holes: set[int]) -> None:
        self.ffi, self.holes, self.calls = ffi, holes, 0

    def xenforeignmemory_map(self, fmh, domid, prot, n, arr, errs):
        self.calls += 1
        for i in range(n):
            if arr[i] in self.holes:
                errs[i] = -errno.EINVAL
        return self.ffi.cast("void *", 0x1000)

    def xenforeignmemory_unmap(self, fmh, ptr, n) -> int:
        return 0


def test_population_probe_skips_holes_in_whole_batches_and_single_frames():
    holes = set(range(0xA0, 0xC0)) | {1023, 1024, 5000}       # VGA hole, a batch boundary, a lone frame
    fm = _ForeignMemoryWithHoles(xl.xen_ffi(), holes)
    b = _ring_only_backend(domid=3, libraries={"xenforeignmemory": fm}, handles={"fmh": None})
    found = b.populated_among(range(6144))                # one run, probed in batches
    assert found == {g for g in range(6144) if g not in holes}
    assert fm.calls == 6                                   # 1024 frames per map call


def test_populated_among_probes_only_the_runs_it_is_asked_about():
    fm = _ForeignMemoryWithHoles(xl.xen_ffi(), set(range(0xA0, 0xC0)))
    b = _ring_only_backend(domid=3, libraries={"xenforeignmemory": fm}, handles={"fmh": None})
    want = {10, 11, 0xA5, 5000, 0x100000}
    assert b.populated_among(want) == want - {0xA5}
    assert fm.calls == 3                      # [10..0xa5], [5000], [0x100000]: not the whole range
    assert b.populated_among({11, 5000}) == {11, 5000} and fm.calls == 3     # answered from memory


def test_ring_methods_without_a_ring_fail_with_enodev():
    b = xb.XenBackend.detached(ring=None)
    for call in (lambda: b.take_requests(), lambda: b.put_responses([]), lambda: b.set_access(0, [1], "r")):
        with pytest.raises(BackendError) as info:
            call()
        assert info.value.errno == errno.ENODEV


# =========================================================================== capability check in the CLI

def test_a_memory_policy_on_a_host_without_mem_access_names_the_missing_capability():
    from policyc.cli_runtime import host_refusal
    from policyc.plan_source import load_plan_source
    from policyc.runtime.backend import Capabilities

    class NoMemAccess:
        """An Intel host whose domain runs on shadow paging: arch x86_64, but no mem_access."""
        capability_notes = {"mem_access": "the domain runs on shadow paging (no HAP)"}

        def capabilities(self) -> Capabilities:
            return Capabilities("x86_64", 7, 1, False, False, 0, False, frozenset({"write_ctrlreg"}))

    plan = load_plan_source(str(KERNEL_INTEGRITY), None).plan
    why = host_refusal(plan, NoMemAccess(), "xen:shadowed", str(KERNEL_INTEGRITY))
    assert "lacks the capability mem_access: the domain runs on shadow paging (no HAP)" in why


# =========================================================================== needs Xen

def test_attach_to_a_real_domain():
    if not os.path.exists("/dev/xen/privcmd"):
        _skip("no /dev/xen/privcmd: attaching needs a Xen dom0 (set POLICYC_XEN_DOMID to a test guest)")
    domid = os.environ.get("POLICYC_XEN_DOMID")
    if not domid:
        _skip("POLICYC_XEN_DOMID is not set: no test guest named on this Xen host")
    with xb.XenBackend.open(domid) as b:
        caps = b.capabilities()
        assert caps.vm_event_version == 7 and caps.vcpus >= 1
        frames = list(b.populated_frames())
        assert frames and b.read_physical(frames[0] << 12, 16) is not None
        assert "cr3" in b.get_registers(0)
        assert b.wait(0.01) in (True, False)
        b.close()


class _ViewWithoutTheFrame:
    """libxenctrl for an altp2m view that never held gfn 0x201: Xen answers ESRCH there (the view's
    entries are filled lazily), while the host p2m gives the frame rx (seen live under Bochs 3.0)."""

    def __init__(self, ffi) -> None:
        self.ffi = ffi

    def xc_get_mem_access(self, xch, domid, gfn, acc) -> int:
        acc[0] = xl.access_code("rx")
        return 0

    def xc_altp2m_get_mem_access(self, xch, domid, view, gfn, acc) -> int:
        self.ffi.errno = errno.ESRCH if gfn == 0x201 else errno.EINVAL
        return -1


def test_access_in_a_view_that_never_held_the_frame_is_the_hosts():
    b = xb.XenBackend.detached(domid=7, libraries={"xenctrl": _ViewWithoutTheFrame(xl.xen_ffi())},
                               handles={"xch": None}, xen_release=xl.RELEASES[0])
    assert b.get_access(2, 0x201) == "rx"
    with pytest.raises(InvalidArgument):            # any other failure is still an error
        b.get_access(2, 0x202)


class _Hypervisor:
    """libxenctrl on a hypervisor of release `version` whose vm_event interface is `vm_event`: what
    attach asks before it turns anything on (the release, the domain, the interface version)."""

    def __init__(self, ffi, version: tuple[int, int], vm_event: int) -> None:
        self.ffi, self.version, self.vm_event = ffi, version, vm_event

    def xc_interface_open(self, logger, dombuild_logger, flags):
        return self.ffi.cast("xc_interface *", 0x1000)

    def xc_version(self, xch, cmd, arg) -> int:
        return self.version[0] << 16 | self.version[1]

    def xc_domain_getinfolist(self, xch, first, n, info) -> int:
        info.domain, info.max_vcpu_id = first, 0
        info.flags = xl.CONSTANTS["XEN_DOMINF_hvm_guest"] | xl.CONSTANTS["XEN_DOMINF_hap"]
        return 1

    def xc_vm_event_get_version(self, xch) -> int:
        return self.vm_event


@pytest.mark.parametrize("release", xl.RELEASES, ids=lambda r: r.version)
def test_attach_refuses_a_vm_event_interface_it_does_not_speak(release):
    # Xen 4.17 and 4.20 both speak interface 7 (both header sets: test_vm_event_abi); another
    # version's requests would be misread, so attach stops before the first monitor is on
    hv = _Hypervisor(xl.xen_ffi(), release.hypervisor, abi.VERSION + 1)
    b = xb.XenBackend.detached(domid=7, libraries={"xenctrl": hv}, handles={"xch": None}, xen_release=release)
    with pytest.raises(Unsupported, match=f"interface version {abi.VERSION + 1}") as exc:
        b.discover()
    assert exc.value.errno == errno.EPROTO


@pytest.mark.parametrize("release", xl.RELEASES, ids=lambda r: r.version)
def test_attach_refuses_a_hypervisor_of_another_release(release):
    # libxenctrl speaks to its own release only (the domctl interface version): a Debian 12 dom0
    # library on a Debian 13 hypervisor, or the other way round, is named, not tried
    other = next(r for r in xl.RELEASES if r is not release)
    hv = _Hypervisor(xl.xen_ffi(), other.hypervisor, abi.VERSION)
    b = xb.XenBackend.detached(domid=7, libraries={"xenctrl": hv}, xen_release=release)
    with pytest.raises(xl.XenUnavailable, match=f"Xen {other.version} runs here.*{release.xenctrl}"):
        b.open_handles()


# =========================================================================== arm64

ARM64_INCLUDE = Path(os.environ.get("POLICYC_XEN_ARM64_INCLUDE", "/tmp/policyc-lab-arm64/root/usr/include"))


def test_arm64_vcpu_context_layout_matches_the_arm64_headers(tmp_path):
    """ARM64_VCPU_CONTEXT against struct vcpu_guest_context of Debian's libxen-dev:arm64, the probe
    cross-compiled and run under qemu-user (tests/lab/lab_arm64.sh fetch unpacks the headers)."""
    gcc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64-static")
    if gcc is None or qemu is None or not (ARM64_INCLUDE / "xen" / "arch-arm.h").is_file():
        _skip(f"needs aarch64-linux-gnu-gcc, qemu-aarch64-static and {ARM64_INCLUDE}/xen/arch-arm.h "
              "(tests/lab/lab_arm64.sh setup)")
    lines = ["#define __XEN_TOOLS__ 1", "#include <stddef.h>", "#include <stdint.h>", "#include <stdio.h>",
             "#include <xenctrl.h>", "int main(void) {",
             '  printf("size %zu %zu\\n", sizeof(vcpu_guest_context_t), sizeof(vcpu_guest_context_any_t));']
    for name, field in xa.ARM64_VCPU_CONTEXT_C.items():
        lines.append(f'  printf("{name} %zu %zu\\n", offsetof(vcpu_guest_context_t, {field}), '
                     f'sizeof(((vcpu_guest_context_t *)0)->{field}));')
    lines += ["  return 0;", "}"]
    (tmp_path / "ctx.c").write_text("\n".join(lines) + "\n")
    build = subprocess.run([gcc, "-static", "-std=gnu11", "-Wall", "-Werror", "-isystem", str(ARM64_INCLUDE),
                            "-o", str(tmp_path / "ctx"), str(tmp_path / "ctx.c")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([qemu, str(tmp_path / "ctx")], capture_output=True, text=True, check=True).stdout
    facts = {k: (int(a), int(b)) for k, a, b in (line.split() for line in out.splitlines())}
    assert facts.pop("size") == (xa.ARM64_VCPU_CONTEXT_SIZE, xa.ARM64_VCPU_CONTEXT_SIZE)
    assert facts == xa.ARM64_VCPU_CONTEXT


def test_arm64_registers_come_from_their_context_fields():
    blob = bytearray(xa.ARM64_VCPU_CONTEXT_SIZE)
    for i, (name, (off, size)) in enumerate(sorted(xa.ARM64_VCPU_CONTEXT.items())):
        blob[off:off + size] = (0x1000 + i).to_bytes(size, "little")
    regs = xa.registers_from_arm64_context(bytes(blob))
    assert regs == {name: 0x1000 + i for i, name in enumerate(sorted(xa.ARM64_VCPU_CONTEXT))}
    # the names the binder and the request use
    assert {"ttbr0", "ttbr1", "ttbcr", "pc", "cpsr"} <= set(regs)


def test_arm64_access_goes_in_runs_of_consecutive_frames_with_one_access():
    assert xa.access_runs([5, 3, 4, 10, 6], [1, 1, 1, 1, 2]) == [(3, 3, 1), (6, 1, 2), (10, 1, 1)]
    assert xa.access_runs([], []) == []


def _backend_over_stand_in_evtchn(fd: int, pending: list[int], calls: list) -> tuple[xb.XenBackend, list]:
    """A XenBackend whose libxenevtchn calls are stand-in C callbacks (ctypes) over a pipe's read end:
    what the native kick and wait call, and in which order, is recorded in `calls`."""
    import ctypes

    def notify(xce, port):
        calls.append(("notify", xce, port))
        return 0

    def take_pending(xce):
        calls.append(("pending", xce))
        os.read(fd, 1)
        return pending.pop(0) if pending else -1

    def unmask(xce, port):
        calls.append(("unmask", xce, port))
        return 0

    keep = [ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)(notify),
            ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(take_pending),
            ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)(unmask)]

    class _Evtchn:
        pass

    ffi = xl.xen_ffi()
    ev = _Evtchn()
    ev.xenevtchn_notify = ffi.cast("int (*)(xenevtchn_handle *, evtchn_port_t)",
                                   ctypes.cast(keep[0], ctypes.c_void_p).value)
    ev.xenevtchn_pending = ffi.cast("xenevtchn_port_or_error_t (*)(xenevtchn_handle *)",
                                    ctypes.cast(keep[1], ctypes.c_void_p).value)
    ev.xenevtchn_unmask = ffi.cast("int (*)(xenevtchn_handle *, evtchn_port_t)",
                                   ctypes.cast(keep[2], ctypes.c_void_p).value)
    ev.xenevtchn_fd = lambda xce: fd
    b = xb.XenBackend.detached(libraries={"xenevtchn": ev}, handles={"xce": ffi.cast("xenevtchn_handle *", 0x1234)},
                               ring=abi.Ring(), port=7)
    return b, keep


def test_the_native_kick_calls_xenevtchn_notify_with_the_handle_and_port():
    r, w = os.pipe()
    try:
        calls: list = []
        b, _keep = _backend_over_stand_in_evtchn(r, [], calls)
        fn, ctx = b.native_notify()
        nffi, nlib = abi.extension()
        assert fn == nffi.addressof(nlib, "vm_evtchn_kick")
        assert nlib.vm_evtchn_kick(ctx) == 0 and calls == [("notify", 0x1234, 7)]
        assert b.native_notify() == (fn, ctx)          # made once per ring
    finally:
        os.close(r)
        os.close(w)


def test_the_native_wait_polls_the_handle_then_takes_and_unmasks_the_port_that_fired():
    r, w = os.pipe()
    try:
        calls: list = []
        b, _keep = _backend_over_stand_in_evtchn(r, [7], calls)
        fn, ctx = b.native_wait()
        nffi, nlib = abi.extension()
        assert fn == nffi.addressof(nlib, "vm_evtchn_wait")
        t0 = time.monotonic()
        assert nlib.vm_evtchn_wait(ctx, 50) == 0 and calls == []      # nothing fired: timed out
        assert time.monotonic() - t0 >= 0.045
        os.write(w, b"x")                                             # the port fired
        assert nlib.vm_evtchn_wait(ctx, 1000) == 1
        assert calls == [("pending", 0x1234), ("unmask", 0x1234, 7)]
        os.write(w, b"x")                                             # pending fails: an error, errno kept
        assert nlib.vm_evtchn_wait(ctx, 1000) == -1
        assert calls[-1] == ("pending", 0x1234)
        os.close(w)
        w = -1
        assert nlib.vm_evtchn_wait(ctx, 1000) == -1                   # the handle hung up: an error
        assert nffi.errno == errno.EIO
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
