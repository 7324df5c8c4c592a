"""Three golden plans derived by hand from their policy text, without running the compiler.

Each test reads the example policy's regions and rules (quoted in the comments), looks the symbols up
in examples/policies/linux-6.1.System.map (Debian 12's 6.1.0-56-amd64, addresses quoted too), and
derives with page arithmetic alone what the golden plan must hold: each region's page count, the
views and their ranges, the pages each view restricts, the breakpoints, and the collateral
analysis's runs of partially watched pages. A reviewer can follow every figure on paper:

    page of an address      = address // 4096
    pages of [start, end)   = the pages from start // 4096 to (end - 1) // 4096
    a rule `on write to R`  traps "w" on R's pages, so the view still allows "rx" there
    a rule `on execute in R` traps "x", the view allows "rw"

The golden files are tests/golden/plans/*.plan.json (tools/regen_golden_plans.py writes them);
tests/test_plan.py checks that the compiler still produces them byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "plans"
PAGE = 4096


def symbol_addresses() -> dict[str, int]:
    """name -> address, read straight from the System.map text (first entry of a name)."""
    out: dict[str, int] = {}
    for line in (REPO / "examples" / "policies" / "linux-6.1.System.map").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            out.setdefault(parts[2], int(parts[0], 16))
    return out


def pages(start: int, end: int) -> set[int]:
    """The page numbers [start, end) touches."""
    return set(range(start // PAGE, (end - 1) // PAGE + 1))


def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.plan.json").read_text(encoding="utf-8"))


def untouched_views() -> list[dict]:
    """With altp2m, view 0 is the host's p2m and view 1 the unrestricted view steps run in: no ranges."""
    return [{"id": 0, "role": "host", "default_access": "rwx", "ranges": []},
            {"id": 1, "role": "unrestricted", "default_access": "rwx", "ranges": []}]


def one_run(start_page: int, watched: int, access: str) -> dict:
    """A run of one partially watched page, in the collateral analysis's layout (figures per page)."""
    return {"space": "va", "start": hex(start_page * PAGE), "pages": 1, "trapped_bytes": PAGE,
            "watched_bytes": watched, "watched_by_access": {access: watched}}


# linux-common.vmi (included by both Linux policies below):
#     region kernel_text = symbol _stext .. symbol _etext
#     region rodata      = symbol __start_rodata .. symbol __end_rodata
#     region kernel_data = symbol _sdata .. symbol _edata, symbol __bss_start .. symbol __bss_stop
#     region syscalls    = symbol sys_call_table size 8 * NR_SYSCALLS        (NR_SYSCALLS = 451)
def common_regions(s: dict[str, int]) -> dict[str, set[int]]:
    # _stext 0xffffffff81000000 .. _etext 0xffffffff81e01d32: pages 0x...81000 to 0x...81e01, 0xe02 = 3586
    text = pages(s["_stext"], s["_etext"])
    assert len(text) == 3586
    # __start_rodata 0xffffffff82000000 .. __end_rodata 0xffffffff828eb000 (page aligned): 0x8eb = 2283
    rodata = pages(s["__start_rodata"], s["__end_rodata"])
    assert len(rodata) == 2283
    # _sdata 0xffffffff82a00000 .. _edata 0xffffffff82c48980: 0x249 = 585 pages (the last one partly);
    # __bss_start 0xffffffff83310000 .. __bss_stop 0xffffffff84400000: 0x10f0 = 4336 pages; 585 + 4336 = 4921
    data = pages(s["_sdata"], s["_edata"]) | pages(s["__bss_start"], s["__bss_stop"])
    assert len(data) == 4921
    # sys_call_table 0xffffffff82000360, 8 * 451 = 0xe18 bytes: up to 0xffffffff82001178, 2 pages
    syscalls = pages(s["sys_call_table"], s["sys_call_table"] + 8 * 451)
    assert len(syscalls) == 2
    return {"kernel_text": text, "rodata": rodata, "kernel_data": data, "syscalls": syscalls}


# linux-exec-from-data.vmi, target x86_64 (altp2m with fast single-step):
#     rule no_exec_data: on execute in kernel_data { deny with #UD ... }
#     rule no_exec_rodata: on execute in rodata { deny with #UD ... }
#     rule text_writes_from_outside: on write to kernel_text where rip not in kernel_text { deny ... }
#     rule poke_other_process: on execute symbol __x64_sys_process_vm_writev { ... }   (breakpoints:
#     rule ptrace_calls: on execute symbol __x64_sys_ptrace { ... }                     exact addresses,
#     rule fileless_exec: on execute symbol __x64_sys_memfd_create { ... }              not page traps)
EXEC_FROM_DATA_RANGES = [  # one range per (region, traps), in region-name order
    {"region": "kernel_data", "traps": "x", "access": "rw", "rules": ["no_exec_data"]},
    {"region": "kernel_text", "traps": "w", "access": "rx", "rules": ["text_writes_from_outside"]},
    {"region": "rodata", "traps": "x", "access": "rw", "rules": ["no_exec_rodata"]},
]


def test_linux_exec_from_data_on_x86_64_by_hand():
    s = symbol_addresses()
    regions = common_regions(s)
    plan = golden("linux-exec-from-data.x86_64")
    assert {name: r["pages"] for name, r in plan["regions"].items()} == {n: len(p) for n, p in regions.items()}
    # No rule names a cr3: one execution context "*", so one restricted view, 2, holding all three ranges.
    assert plan["views"] == untouched_views() + [
        {"id": 2, "role": "restricted", "contexts": ["*"], "default_access": "rwx", "ranges": EXEC_FROM_DATA_RANGES}]
    # The restricted pages: the three trapped regions do not overlap (text < rodata < data in memory),
    # 4921 + 3586 + 2283 = 10790.
    restricted = regions["kernel_data"] | regions["kernel_text"] | regions["rodata"]
    assert len(restricted) == 10790
    (view,) = plan["analyses"]["views"]["views"]
    assert view["id"] == 2 and view["pages_restricted"] == len(restricted)
    # The breakpoints, in address order, planted in view 2 (int3 in a shadow frame), stepped in view 1.
    sites = sorted(s[f] for f in ("__x64_sys_process_vm_writev", "__x64_sys_ptrace", "__x64_sys_memfd_create"))
    assert [(int(b["address"], 16), b["views"], b["step_view"]) for b in plan["breakpoints"]] == \
        [(a, [2], 1) for a in sites]
    assert view["breakpoints"] == [hex(a) for a in sites]
    # Collateral: a page is trapped whole. kernel_text ends at 0x...81e01d32, so its last page
    # 0x...81e01000 has 0xd32 = 3378 watched bytes; kernel_data's _edata 0x...82c48980 leaves 0x980 = 2432
    # on page 0x...82c48000 (the BSS part is page aligned); rodata is page aligned at both ends.
    collateral = plan["analyses"]["collateral"]["regions"]
    assert collateral["kernel_text"]["partial_runs"] == [one_run(s["_etext"] // PAGE, s["_etext"] % PAGE, "write")]
    assert collateral["kernel_data"]["partial_runs"] == [one_run(s["_edata"] // PAGE, s["_edata"] % PAGE, "execute")]
    assert (s["_etext"] % PAGE, s["_edata"] % PAGE) == (3378, 2432)
    assert collateral["rodata"]["partial_runs"] == []


def test_linux_exec_from_data_without_altp2m_by_hand():
    # Target x86_64-nomtf: no fast single-step, so no altp2m views: the same three ranges go into the
    # host's p2m (view 0), and breakpoints are written into the guest's own frames.
    s = symbol_addresses()
    regions = common_regions(s)
    plan = golden("linux-exec-from-data.x86_64-nomtf")
    assert {name: r["pages"] for name, r in plan["regions"].items()} == {n: len(p) for n, p in regions.items()}
    assert plan["views"] == [{"id": 0, "role": "host", "default_access": "rwx", "ranges": EXEC_FROM_DATA_RANGES}]
    analysis = plan["analyses"]["views"]
    assert analysis["mechanism"] == "host-p2m"
    (view,) = analysis["views"]
    assert view["id"] == 0 and view["pages_restricted"] == 4921 + 3586 + 2283
    assert all("views" not in b for b in plan["breakpoints"])


def test_linux_kernel_integrity_on_x86_64_by_hand():
    # linux-kernel-integrity.vmi (its own regions, the same definitions as linux-common.vmi, plus):
    #     region idt = symbol idt_table size 4096
    #     rule protect_tables: on write to syscalls, idt { deny ... }
    #     rule no_exec_rodata: on execute in rodata { deny ... }
    #     rule wp_guard / smep_smap_guard: on write cr0 / cr4 ...    (control registers: no pages)
    #     rule syscall_entry_guard: on write msr LSTAR ...           (an MSR: no pages)
    #     rule trace_creds: on execute symbol commit_creds { ... }   (a breakpoint)
    s = symbol_addresses()
    common = common_regions(s)
    # idt_table 0xffffffff83313000 is page aligned: 4096 bytes are one page.
    idt = pages(s["idt_table"], s["idt_table"] + 4096)
    assert len(idt) == 1
    plan = golden("linux-kernel-integrity.x86_64")
    assert {name: r["pages"] for name, r in plan["regions"].items()} == {
        "idt": 1, "kernel_text": len(common["kernel_text"]), "rodata": len(common["rodata"]), "syscalls": 2}
    assert plan["views"] == untouched_views() + [{
        "id": 2, "role": "restricted", "contexts": ["*"], "default_access": "rwx", "ranges": [
            {"region": "idt", "traps": "w", "access": "rx", "rules": ["protect_tables"]},
            {"region": "rodata", "traps": "x", "access": "rw", "rules": ["no_exec_rodata"]},
            {"region": "syscalls", "traps": "w", "access": "rx", "rules": ["protect_tables"]}]}]
    # sys_call_table lies inside rodata (0x...82000360 is past __start_rodata 0x...82000000), so its two
    # pages are already restricted; idt_table is in the BSS, outside rodata: 2283 + 1 = 2284 pages.
    assert common["syscalls"] <= common["rodata"] and not idt & common["rodata"]
    restricted = common["rodata"] | common["syscalls"] | idt
    assert len(restricted) == 2284
    (view,) = plan["analyses"]["views"]["views"]
    assert view["pages_restricted"] == len(restricted)
    assert view["breakpoints"] == [hex(s["commit_creds"])]
    # Collateral of syscalls (watched only by protect_tables' writes): its first page holds
    # 0x1000 - 0x360 = 3232 of its bytes, its second 0x1178 - 0x1000 = 376: two runs, different figures.
    start, end = s["sys_call_table"], s["sys_call_table"] + 8 * 451
    runs = plan["analyses"]["collateral"]["regions"]["syscalls"]["partial_runs"]
    assert runs == [one_run(start // PAGE, PAGE - start % PAGE, "write"), one_run(end // PAGE, end % PAGE, "write")]
    assert [r["watched_bytes"] for r in runs] == [3232, 376]
