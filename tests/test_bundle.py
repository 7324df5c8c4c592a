"""Signed plan bundles: built by CI, verified on the host, the last good one kept.

Each refusal (tampered signature or member, expired, replayed older revision, a server that is
down) leaves the last good bundle enforcing; a good new revision replaces it. HTTP is a real
server on loopback."""

from __future__ import annotations

import datetime as dt
import shutil
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="bundles need the 'cryptography' package (the bundle extra)")

from policyc.bundle import BundleError, BundleStore, build_bundle, fetch_bundle, generate_key, verify_bundle
from policyc.cli import main

from helpers import BundleServer, flip_bit as _flip, tar_members as _members, tar_of as _repack

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "examples" / "policies" / "linux-kernel-integrity.vmi"
SCENARIO = ROOT / "examples" / "scenarios" / "rootkit-hooks-syscall-table.yaml"
NOW = dt.datetime.now(dt.timezone.utc)


@pytest.fixture(scope="module")
def keys(bundle_keys):
    return bundle_keys


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    assert main(["compile", str(POLICY), "-o", str(d / "plan.json")]) == 0
    shutil.copy(ROOT / "examples" / "policies" / "linux-6.1.System.map", d)
    return d


def _bundle(plan_dir, keys, revision, days=30.0) -> bytes:
    return build_bundle(plan_dir / "plan.json", key_pem=keys[0], revision=revision,
                        not_after=NOW + dt.timedelta(days=days))


def test_a_good_bundle_verifies_and_is_deterministic(plan_dir, keys):
    raw = _bundle(plan_dir, keys, 2)
    b = verify_bundle(raw, trusted_pem=keys[1])
    assert b.revision == 2 and b.manifest["policy"] == "linux-kernel-integrity"
    assert set(b.symbols) == {"linux-6.1.System.map"}
    assert build_bundle(plan_dir / "plan.json", key_pem=keys[0], revision=2,
                        not_after=NOW + dt.timedelta(days=30)) == raw


@pytest.mark.parametrize("how,message", [
    ("signature", "bad signature"),
    ("manifest", "bad signature"),
    ("plan", "does not match its digest"),
    ("extra member", "members differ"),
    ("link", "not a plain file"),
    ("traversal", "not a plain file"),
    ("other key", "bad signature"),
    ("not a tar", "not a (policyc )?bundle"),
])
def test_a_tampered_bundle_is_refused(plan_dir, keys, how, message):
    m = _members(_bundle(plan_dir, keys, 2))
    trusted = keys[1]
    if how == "signature":
        m["manifest.sig"] = _flip(m["manifest.sig"])
    elif how == "manifest":
        m["manifest.json"] = m["manifest.json"].replace(b'"revision": 2', b'"revision": 9')
    elif how == "plan":
        m["plan.json"] = m["plan.json"].replace(b'"deny"', b'"allow"', 1)
    elif how == "extra member":
        m["symbols/extra.map"] = b"x"
    elif how == "other key":
        trusted = generate_key()[1]
    raw = _repack(m)
    if how == "link":
        link = tarfile.TarInfo("symbols/evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        raw = _repack(m, link)
    elif how == "traversal":
        raw = _repack({**m, "../escape": b"x"})
    elif how == "not a tar":
        raw = b"garbage that is no tar archive" * 40
    with pytest.raises(BundleError, match=message):
        verify_bundle(raw, trusted_pem=trusted)


def test_expired_and_replayed_bundles_are_refused(plan_dir, keys):
    raw = _bundle(plan_dir, keys, 4, days=1)
    with pytest.raises(BundleError, match="expired"):
        verify_bundle(raw, trusted_pem=keys[1], now=NOW + dt.timedelta(days=2))
    with pytest.raises(BundleError, match="not newer than the active revision 5"):
        verify_bundle(raw, trusted_pem=keys[1], active_revision=5)
    assert verify_bundle(raw, trusted_pem=keys[1], active_revision=3).revision == 4


@pytest.fixture
def server():
    s = BundleServer()
    yield s
    s.close()


def test_fetch_over_http_uses_etags(plan_dir, keys, server):
    server.body = _bundle(plan_dir, keys, 1)
    raw, etag = fetch_bundle(server.url)
    assert raw == server.body and etag
    assert fetch_bundle(server.url, etag=etag) == (None, etag)
    assert server.answers == [(None, 200), (etag, 304)]


def _run(tmp_path, source, trusted: Path, capsys) -> tuple[int, str]:
    rc = main(["run", "--bundle", str(source), "--trust", str(trusted), "--bundle-cache", str(tmp_path / "cache"),
               "--guest", f"sim:{SCENARIO}"])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_run_keeps_the_last_good_bundle(plan_dir, keys, server, tmp_path, capsys):
    trusted = tmp_path / "ci.pub"
    trusted.write_bytes(keys[1])
    # nothing good yet and a server that has nothing: nothing is installed
    rc, out = _run(tmp_path, server.url, trusted, capsys)
    assert rc == 2 and "HTTP 404" in out and "nothing was installed" in out
    # a good revision 5 activates and is kept
    server.body = _bundle(plan_dir, keys, 5)
    rc, out = _run(tmp_path, server.url, trusted, capsys)
    assert rc == 0 and "bundle revision 5 from" in out and "DENIED" in out
    assert BundleStore(tmp_path / "cache").load(keys[1]).revision == 5
    # each refusal runs the last good bundle, saying why
    refusals = {
        "tampered": _repack({**_members(_bundle(plan_dir, keys, 6)),
                             "manifest.sig": _flip(_members(_bundle(plan_dir, keys, 6))["manifest.sig"])}),
        "older": _bundle(plan_dir, keys, 4),
        "expired": build_bundle(plan_dir / "plan.json", key_pem=keys[0], revision=7,
                                not_after=NOW - dt.timedelta(seconds=1)),
    }
    for why, body in refusals.items():
        server.body = body
        rc, out = _run(tmp_path, server.url, trusted, capsys)
        assert rc == 0 and "the last good bundle, revision 5" in out and "DENIED" in out, (why, out)
        assert BundleStore(tmp_path / "cache").load(keys[1]).revision == 5
    # the server down: the last good bundle still protects the guest
    server.close()
    rc, out = _run(tmp_path, server.url, trusted, capsys)
    assert rc == 0 and "the last good bundle, revision 5" in out and "DENIED" in out
    # a good new revision from a file replaces it
    newer = tmp_path / "r8.bundle"
    newer.write_bytes(_bundle(plan_dir, keys, 8))
    rc, out = _run(tmp_path, newer, trusted, capsys)
    assert rc == 0 and "bundle revision 8 from" in out
    assert BundleStore(tmp_path / "cache").load(keys[1]).revision == 8


def test_cli_build_and_verify(plan_dir, tmp_path, capsys):
    prefix = tmp_path / "ci"
    assert main(["bundle", "keygen", str(prefix)]) == 0
    assert (tmp_path / "ci.key").stat().st_mode & 0o077 == 0
    assert main(["bundle", "keygen", str(prefix)]) == 2            # never overwrites a key
    out = tmp_path / "b.bundle"
    assert main(["bundle", "build", str(plan_dir / "plan.json"), "--key", str(tmp_path / "ci.key"),
                 "--revision", "1", "--not-after", "2099-01-01T00:00:00Z", "-o", str(out)]) == 0
    assert main(["bundle", "verify", str(out), "--trust", str(tmp_path / "ci.pub")]) == 0
    assert main(["bundle", "verify", str(out), "--trust", str(tmp_path / "ci.pub"), "--newer-than", "1"]) == 1
    assert main(["bundle", "build", str(plan_dir / "plan.json"), "--key", str(tmp_path / "ci.key"),
                 "--revision", "1", "--not-after", "2099-01-01", "-o", str(out)]) == 2   # no time zone
    assert main(["bundle", "build", str(tmp_path / "nope.json"), "--key", str(tmp_path / "ci.key"),
                 "--revision", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "needs a time zone" in err


def test_build_writes_through_devices_and_replaces_regular_files_whole(plan_dir, tmp_path, capsys):
    import os
    import stat

    assert main(["bundle", "keygen", str(tmp_path / "k")]) == 0
    args = ["bundle", "build", str(plan_dir / "plan.json"), "--key", str(tmp_path / "k.key"), "--revision", "2",
            "--not-after", "2099-01-01T00:00:00Z", "-o"]
    assert main(args + [os.devnull]) == 0
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)              # /dev/null stays a device
    out = tmp_path / "b.bundle"
    out.write_bytes(b"old")
    assert main(args + [str(out)]) == 0
    assert verify_bundle(out.read_bytes(), trusted_pem=(tmp_path / "k.pub").read_bytes()).revision == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bundle", "k.key", "k.pub"]   # no temporary left
    assert main(args + [str(tmp_path)]) == 2                        # a directory: one line, exit 2
    assert "it is a directory" in capsys.readouterr().err


def test_a_plan_that_names_its_symbols_by_a_path_is_refused_at_build_not_on_the_hosts(keys, tmp_path):
    plan = tmp_path / "plan.json"
    assert main(["compile", str(ROOT / "examples" / "policies" / "reload" / "syscalls-only.vmi"), "-o", str(plan)]) == 0
    with pytest.raises(BundleError, match="names its symbol file by a path, '../linux-6.1.System.map'"):
        build_bundle(plan, key_pem=keys[0], revision=1, not_after=NOW + dt.timedelta(days=1),
                     symbols_dir=ROOT / "examples" / "policies" / "reload")
