"""The view layout with many `cr3 ==` contexts (policyc/lowering/views.py): contexts are grouped by
their permission map (the global restrictions plus their own), a context whose own pages the global
map already restricts shares the global map, and the conflict graph's figures follow from the groups.
How the layout's cost grows with contexts is a figure: `python bench/compile_scale.py --contexts 100`."""

from __future__ import annotations

import shutil
from pathlib import Path

from policyc.check import check_policy
from policyc.diagnostics import Diagnostics
from policyc.compiler import compile_plan

ROOT = Path(__file__).resolve().parent.parent


def _compile(tmp_path: Path, body: str) -> tuple[dict, Diagnostics]:
    shutil.copy(ROOT / "examples" / "policies" / "linux-6.1.System.map", tmp_path)
    path = tmp_path / "p.vmi"
    path.write_text('policy "t" {\n    target xen >= 4.17 on x86_64\n    symbols "linux-6.1.System.map"\n'
                    f"    mode enforce\n{body}\n}}\n")
    d = Diagnostics()
    policy = check_policy(path, d)
    assert policy is not None, [(x.code, x.message) for x in d]
    plan = compile_plan(policy, d)
    assert plan is not None, [(x.code, x.message) for x in d]
    return plan, d


def test_contexts_within_the_global_map_share_its_view_and_the_rest_group_by_their_own_pages(tmp_path):
    # A global map of 40 pages; 30 contexts whose own pages lie inside it (their maps are the global
    # map); 3 groups of 4 contexts each watching one page of its own beyond it (three maps more).
    lines = ["    region tbl = symbol _sdata size 40 * 0x1000", "    rule everyone: on write to tbl { deny }"]
    for i in range(30):
        lines.append(f"    region in{i} = symbol _sdata + {i} * 0x1000 size 8")
        lines.append(f"    rule in{i}: on write to in{i} where cr3 == {0x1000 * (i + 1):#x} {{ deny }}")
    for g in range(3):
        lines.append(f"    region out{g} = symbol _sdata + {50 + 2 * g} * 0x1000 size 8")
        for k in range(4):
            lines.append(f"    rule out{g}_{k}: on write to out{g} where cr3 == {0x100000 * (g + 1) + 0x1000 * k:#x} "
                         "{ deny }")
    plan, d = _compile(tmp_path, "\n".join(lines))
    report = plan["analyses"]["views"]
    # 43 contexts with maps (the global one too) in 4 groups of 31, 4, 4 and 4: every pair across groups
    # is an edge, (43^2 - 31^2 - 3 * 4^2) / 2.
    assert report["conflict_graph"] == {"nodes": 43, "edges": 420, "colours": 4}
    restricted = [v for v in plan["views"] if v["role"] == "restricted"]
    assert [len(v["contexts"]) for v in restricted] == [31, 4, 4, 4]
    assert restricted[0]["contexts"][0] == "*"
    assert report["merges"] == [] and not [x for x in d if x.code == "PC502"]
    # The global view restricts the 40 pages; each other view those and its group's own page.
    assert [v["pages_restricted"] for v in report["views"]] == [40, 41, 41, 41]
    assert report["contexts"]["cr3=0x100000"]["pages_restricted"] == 41
    assert report["contexts"]["cr3=0x1000"]["pages_restricted"] == 40


def test_twenty_distinct_contexts_merge_cheapest_first_down_to_the_views(tmp_path):
    # Context i watches i + 1 pages of its own: the cheapest merges are of the smallest maps.
    lines = []
    for i in range(20):
        lines.append(f"    region p{i} = symbol _sdata + {100 * i} * 0x1000 size {i + 1} * 0x1000")
        lines.append(f"    rule r{i}: on write to p{i} where cr3 == {0x1000 * (i + 1):#x} {{ deny }}")
    plan, d = _compile(tmp_path, "\n".join(lines))
    report = plan["analyses"]["views"]
    assert report["conflict_graph"] == {"nodes": 20, "edges": 190, "colours": 20}
    merges = report["merges"]
    assert len(merges) == 12 and len([x for x in d if x.code == "PC502"]) == 12
    # First cr3=0x1000 (1 page) with cr3=0x2000 (2 pages): each traps the other's, 1 + 2 pages.
    assert merges[0]["contexts"] == [["cr3=0x1000"], ["cr3=0x2000"]] and merges[0]["extra_trapped_pages"] == 3
    placed = sorted(c for v in plan["views"] if v["role"] == "restricted" for c in v["contexts"])
    assert len(placed) == 20 and len(set(placed)) == 20
