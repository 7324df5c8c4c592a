"""`policyc bundle keygen|build|verify`, and how `policyc run --bundle` resolves a bundle to a plan.

Exit codes as everywhere: 0 good, 1 a bundle that does not verify, 2 usage errors.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ResolvedBundle", "add_bundle_commands", "add_bundle_run_arguments", "resolve_bundle"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
DEFAULT_BUNDLE_POLL = 60.0      # seconds between fetches of a --bundle URL (OPA's bundles: 60-120 s)


def add_bundle_commands(sub: Any) -> None:
    b = sub.add_parser("bundle", help="sign a compiled plan and its symbol files for hosts (keygen, build, verify)",
                       description="Plan bundles: what CI compiled and reviewed, signed with Ed25519, for "
                                   "`policyc run --bundle FILE|URL --trust KEY` on the hosts.")
    bsub = b.add_subparsers(dest="bundle_command", metavar="ACTION")
    kg = bsub.add_parser("keygen", help="write a new Ed25519 key pair: PREFIX.key (private) and PREFIX.pub")
    kg.add_argument("prefix", metavar="PREFIX")
    kg.set_defaults(run=_cmd_keygen)
    bd = bsub.add_parser("build", help="sign a plan (`policyc compile -o`) and its symbol files into a bundle")
    bd.add_argument("plan", metavar="PLAN.json")
    bd.add_argument("--key", required=True, metavar="KEYFILE", help="Ed25519 private key (PEM)")
    bd.add_argument("--revision", required=True, type=int, metavar="N",
                    help="a positive integer, larger than every bundle the hosts have seen")
    when = bd.add_mutually_exclusive_group()
    when.add_argument("--not-after", metavar="RFC3339", help="expiry, e.g. 2027-01-31T00:00:00Z")
    when.add_argument("--valid-days", type=float, default=30.0, metavar="DAYS", help="expiry from now (default 30)")
    bd.add_argument("--symbols", metavar="DIR", help="where the plan's symbol files are (default: beside the plan)")
    bd.add_argument("-o", "--output", required=True, metavar="FILE")
    bd.set_defaults(run=_cmd_build)
    vf = bsub.add_parser("verify", help="check a bundle's signature, members, expiry and plan")
    vf.add_argument("bundle", metavar="FILE|URL")
    vf.add_argument("--trust", required=True, metavar="KEYFILE", help="Ed25519 public key (PEM)")
    vf.add_argument("--newer-than", type=int, metavar="N", help="also refuse a revision not newer than N")
    vf.set_defaults(run=_cmd_verify)
    b.set_defaults(run=lambda args: (b.print_help(sys.stderr), EXIT_USAGE)[1])


@dataclass
class ResolvedBundle:
    """What `run --bundle` runs: the unpacked plan and its symbols, the verified bundle, where the
    last good one is kept, the trusted key and the ETag the bundle was fetched with (for polling)."""

    plan: str
    symbols: str
    how: str
    bundle: Any
    store: Any
    trusted: bytes
    etag: str | None = None
    fetched: bool = True


def add_bundle_run_arguments(run: Any) -> None:
    """`policyc run`'s --bundle, --trust, --bundle-cache and --bundle-poll."""
    run.add_argument("--bundle", metavar="FILE|URL", help="run the plan of a signed bundle (`policyc bundle build`) "
                     "instead of POLICY; when it cannot be fetched or does not verify, the last good bundle runs")
    run.add_argument("--trust", metavar="KEYFILE", help="the Ed25519 public key bundles must be signed with")
    run.add_argument("--bundle-cache", metavar="DIR", help="where the last good bundle is kept across restarts "
                     "(default: $STATE_DIRECTORY/bundles under systemd, else beside the install journal)")
    run.add_argument("--bundle-poll", type=float, default=DEFAULT_BUNDLE_POLL, metavar="SECONDS",
                     help="with --bundle URL on a simhost: or xen: guest: fetch the URL about this often "
                          "(If-None-Match, each wait jittered by up to 25%%) and hot-reload a newer bundle that "
                          f"verifies; a restart enforces the last good bundle before asking the network "
                          f"(default {DEFAULT_BUNDLE_POLL:g}; 0: read the bundle at start only)")


def resolve_bundle(source: str, trust: str, cache: str | None, *, last_good_first: bool = False) -> ResolvedBundle:
    """The plan to run for `run --bundle`.

    The bundle is fetched and verified; it must be at least as new as the last good one kept in
    `cache`, where it then replaces it. When it cannot be had or does not verify, the last good
    bundle runs instead (verified again) and `how` says why; with none, `BundleError`. With
    `last_good_first` (a run that polls the URL), a last good bundle runs at once without asking
    the network: the poller fetches the URL as soon as protection is in place."""
    from .bundle import BundleError, BundleStore, fetch_bundle, verify_bundle

    trusted = _read_key(trust, "--trust")
    store = BundleStore(_cache_dir(cache))
    try:
        last_good = store.load(trusted)
    except BundleError as exc:
        print(f"policyc run: the last good bundle is not usable: {exc}", file=sys.stderr)
        last_good = None
    etag, fetched = None, False
    if last_good_first and last_good is not None:
        bundle = last_good
        how = f"the last good bundle, revision {bundle.revision} (kept in {store.path}); polling {source}"
    else:
        try:
            raw, etag = fetch_bundle(source)
            bundle = verify_bundle(raw or b"", trusted_pem=trusted,
                                   active_revision=last_good.revision if last_good else None,
                                   allow_same_revision=True)
            store.save(bundle)
            how, fetched = f"bundle revision {bundle.revision} from {source}", True
        except BundleError as exc:
            if last_good is None:
                raise
            bundle, etag = last_good, None
            how = f"the last good bundle, revision {bundle.revision} ({source}: {exc})"
    plan = bundle.unpack(store.directory / "active")
    return ResolvedBundle(str(plan), str(plan.parent), how, bundle, store, trusted, etag, fetched)


# --------------------------------------------------------------------------- commands

def _cmd_keygen(args: argparse.Namespace) -> int:
    from .bundle import BundleError, generate_key

    try:
        private, public = generate_key()
    except BundleError as exc:
        print(f"policyc bundle keygen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    key, pub = Path(args.prefix + ".key"), Path(args.prefix + ".pub")
    for p in (key, pub):
        if p.exists():
            print(f"policyc bundle keygen: {p} exists; not overwritten", file=sys.stderr)
            return EXIT_USAGE
    try:
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        pub.write_bytes(public)
    except OSError as exc:
        print(f"policyc bundle keygen: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {key} (keep it secret) and {pub} (give it to the hosts: run --trust)", file=sys.stderr)
    return EXIT_OK


def _cmd_build(args: argparse.Namespace) -> int:
    from .bundle import BundleError, build_bundle

    try:
        not_after = (_parse_time(args.not_after) if args.not_after
                     else _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(days=args.valid_days))
        data = build_bundle(args.plan, key_pem=_read_key(args.key, "--key"), revision=args.revision,
                            not_after=not_after, symbols_dir=args.symbols)
    except BundleError as exc:
        print(f"policyc bundle build: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .output_writer import write_output

    # as `compile -o`: a regular file replaced atomically, a device, FIFO or symlink written through
    if not write_output(Path(args.output), data, "bundle build"):
        return EXIT_USAGE
    print(f"wrote {args.output}: revision {args.revision}, {len(data)} bytes", file=sys.stderr)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from .bundle import BundleError, fetch_bundle, verify_bundle

    try:
        trusted = _read_key(args.trust, "--trust")
        raw, _ = fetch_bundle(args.bundle)
        bundle = verify_bundle(raw or b"", trusted_pem=trusted, active_revision=args.newer_than)
    except BundleError as exc:
        print(f"policyc bundle verify: {args.bundle}: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    m = bundle.manifest
    print(f"{args.bundle}: good: revision {m['revision']}, policy {m['policy']} for {m['target']}, "
          f"plan {m['plan_hash'][:19]}…, {len(bundle.symbols)} symbol file(s), not after {m['not_after']}")
    return EXIT_OK


# --------------------------------------------------------------------------- helpers

def _read_key(path: str, flag: str) -> bytes:
    from .bundle import BundleError

    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"{flag} {path}: {exc.strerror}") from None


def _parse_time(text: str) -> _dt.datetime:
    from .bundle import BundleError

    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BundleError(f"--not-after {text!r} is not an RFC 3339 time (e.g. 2027-01-31T00:00:00Z)") from None
    if t.tzinfo is None:
        raise BundleError(f"--not-after {text!r} needs a time zone (e.g. a trailing Z)")
    return t


def _cache_dir(cache: str | None) -> Path:
    """Where the last good bundle is kept: --bundle-cache, else systemd's StateDirectory, else beside
    the install journal."""
    if cache:
        return Path(cache)
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0]) / "bundles"
    from .runtime.state_record import default_state_dir

    return default_state_dir() / "bundles"
