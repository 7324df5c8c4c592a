"""Plan bundles: a compiled plan and its symbol files, signed, for hosts that run what CI built.

A bundle is an uncompressed POSIX tar with three kinds of member:

    manifest.json      what the bundle is: revision, policy name and plan hash, target,
                       not-after, and the SHA-256 and size of every other member
    manifest.sig       an Ed25519 signature over the manifest's exact bytes (raw, 64 bytes)
    plan.json          the trap plan as `policyc compile` wrote it
    symbols/NAME       each symbol file the plan names (by the name the plan records)

`build_bundle` writes one (deterministic: same inputs, same bytes); `verify_bundle` is the only way
in: it checks the signature against the trusted public key, that the members are exactly those the
manifest lists with their digests, that the bundle has not expired, that its plan's content hash is
the one the manifest names, and (given the revision now active) that it is newer, so an old bundle
cannot be replayed. Nothing is written to disk while verifying; members are read with size limits
and a tar's links, devices and paths that climb out are refused.

`BundleStore` keeps the last good bundle of a host (the raw bytes, verified again when read), so a
restarted enforcer protects its guest before the network is up.

Ed25519 is Python's `cryptography` (the `bundle` extra): a maintained implementation, and the same
key format OpenSSL writes (`openssl genpkey -algorithm ed25519`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import PolicycError

__all__ = ["Bundle", "BundleError", "BundleStore", "build_bundle", "verify_bundle", "fetch_bundle",
           "generate_key", "is_url", "MANIFEST_FORMAT"]

MANIFEST_FORMAT = "policyc-bundle/1"
MAX_BUNDLE_BYTES = 512 << 20        # a plan and a kernel's ISF fit many times over
MAX_MEMBERS = 64


class BundleError(PolicycError):
    """A bundle that cannot be used (unreadable, unsigned by the trusted key, expired, replayed)."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its manifest, the plan's text and the symbol files' bytes by name."""

    manifest: dict
    plan_text: str
    symbols: Mapping[str, bytes]
    raw: bytes

    @property
    def revision(self) -> int:
        return int(self.manifest["revision"])

    def unpack(self, directory: str | Path) -> Path:
        """Write the plan and its symbol files into `directory` (as `policyc compile -o` lays them
        out: symbols beside the plan); returns the plan's path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self.symbols.items():
            _write_atomically(d / name, data)
        plan = d / "plan.json"
        _write_atomically(plan, self.plan_text.encode("utf-8"))
        return plan


def generate_key() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PEM, public PEM)."""
    ed = _ed25519()
    from cryptography.hazmat.primitives import serialization as ser

    key = ed.Ed25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    public = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def build_bundle(plan_path: str | Path, *, key_pem: bytes, revision: int, not_after: _dt.datetime,
                 symbols_dir: str | Path | None = None) -> bytes:
    """Sign a compiled plan and its symbol files into bundle bytes."""
    from .plan import PlanError, load_plan

    plan_path = Path(plan_path)
    try:
        plan = load_plan(plan_path)
    except PlanError as exc:
        raise BundleError(str(exc)) from None
    if revision < 1:
        raise BundleError(f"revision must be a positive integer, not {revision}")
    where = Path(symbols_dir) if symbols_dir else plan_path.parent
    members: dict[str, bytes] = {"plan.json": plan_path.read_bytes()}
    for ref in plan["policy"].get("symbols", ()):
        name = ref["name"]
        if "/" in name or "\\" in name or name in (".", ".."):
            # a bundle holds symbols/NAME; a path there is refused by every host (verify_bundle)
            raise BundleError(f"the plan names its symbol file by a path, '{name}': a bundle holds symbol "
                              "files by their name alone; compile a policy whose `symbols` line names a file "
                              "beside it")
        try:
            data = (where / ref["name"]).read_bytes()
        except OSError as exc:
            raise BundleError(f"the plan needs its symbol file {ref['name']}: {exc.strerror} in {where}") from None
        if hashlib.sha256(data).hexdigest() != ref["sha256"]:
            raise BundleError(f"{where / ref['name']} is not the symbol file the plan was compiled against")
        members[f"symbols/{ref['name']}"] = data
    manifest = {
        "format": MANIFEST_FORMAT,
        "revision": revision,
        "policy": plan["policy"]["name"],
        "plan_hash": plan["content_hash"],
        "target": plan["target"]["arch"],
        "not_after": _rfc3339(not_after),
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                  for name, data in sorted(members.items())},
    }
    manifest_bytes = (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode("utf-8")
    signature = _load_private(key_pem).sign(manifest_bytes)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("manifest.json", manifest_bytes), ("manifest.sig", signature),
                           *sorted(members.items())]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def verify_bundle(raw: bytes, *, trusted_pem: bytes, active_revision: int | None = None,
                  now: _dt.datetime | None = None, allow_same_revision: bool = False) -> Bundle:
    """The bundle in `raw`, checked as the module docstring says; `BundleError` names what failed."""
    from .plan import PlanError, seal, validate_plan

    if len(raw) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle of {len(raw)} bytes is over the {MAX_BUNDLE_BYTES >> 20} MiB limit")
    members = _read_members(raw)
    manifest_bytes, signature = members.pop("manifest.json", None), members.pop("manifest.sig", None)
    if manifest_bytes is None or signature is None:
        raise BundleError("not a policyc bundle: manifest.json or manifest.sig is missing")
    from cryptography.exceptions import InvalidSignature

    try:
        _load_public(trusted_pem).verify(signature, manifest_bytes)
    except InvalidSignature:
        raise BundleError("bad signature: the manifest is not signed by the trusted key") from None
    try:
        manifest = json.loads(manifest_bytes)
        files = manifest["files"]
        revision = int(manifest["revision"])
        not_after = _dt.datetime.fromisoformat(str(manifest["not_after"]).replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"manifest is not readable: {exc}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise BundleError(f"manifest format {manifest.get('format')!r}; this policyc reads {MANIFEST_FORMAT}")
    if set(files) != set(members):
        extra, missing = sorted(set(members) - set(files)), sorted(set(files) - set(members))
        raise BundleError(f"members differ from the manifest (not listed: {extra}, absent: {missing})")
    for name, data in members.items():
        if hashlib.sha256(data).hexdigest() != files[name].get("sha256"):
            raise BundleError(f"{name} does not match its digest in the signed manifest")
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if not_after.tzinfo is None or now >= not_after:
        raise BundleError(f"bundle revision {revision} expired at {manifest['not_after']}")
    if active_revision is not None and (revision < active_revision
                                        or revision == active_revision and not allow_same_revision):
        raise BundleError(f"bundle revision {revision} is not newer than the active revision {active_revision} "
                          "(an older bundle replayed?)")
    try:
        plan_text = members["plan.json"].decode("utf-8")
        plan = json.loads(plan_text)
    except (KeyError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"plan.json is missing or not JSON: {exc}") from None
    problems = validate_plan(plan)
    if problems:
        raise BundleError("plan.json is not a valid trap plan: " + "; ".join(problems[:3]))
    if seal(plan)["content_hash"] != plan["content_hash"] or plan["content_hash"] != manifest.get("plan_hash"):
        raise BundleError("plan.json's content hash is not the one the manifest names")
    symbols = {name[len("symbols/"):]: data for name, data in members.items() if name.startswith("symbols/")}
    for ref in plan["policy"].get("symbols", ()):
        if hashlib.sha256(symbols.get(ref["name"], b"")).hexdigest() != ref["sha256"]:
            raise BundleError(f"the bundle lacks the symbol file {ref['name']} the plan was compiled against")
    return Bundle(manifest, plan_text, symbols, raw)


def is_url(source: str) -> bool:
    """Whether a bundle source is fetched over HTTP(S) (and so can be polled), not read from a file."""
    return source.startswith(("http://", "https://"))


def fetch_bundle(source: str, *, etag: str | None = None, timeout: float = 30.0) -> tuple[bytes | None, str | None]:
    """The bundle's bytes from a file path or an http(s) URL, and its ETag. With `etag`, a server
    that answers 304 Not Modified gives (None, etag)."""
    if not is_url(source):
        try:
            with open(source, "rb") as f:
                data = f.read(MAX_BUNDLE_BYTES + 1)
        except OSError as exc:
            raise BundleError(f"cannot read bundle '{source}': {exc.strerror}") from None
        return data, None
    import urllib.error
    import urllib.request

    req = urllib.request.Request(source, headers={"If-None-Match": etag} if etag else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:   # noqa: S310 - http(s) only, checked above
            return resp.read(MAX_BUNDLE_BYTES + 1), resp.headers.get("ETag")
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return None, etag
        raise BundleError(f"{source}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise BundleError(f"{source}: {getattr(exc, 'reason', exc)}") from None


class BundleStore:
    """The last good bundle of one host, kept across restarts (`active.bundle` in `directory`)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @property
    def path(self) -> Path:
        return self.directory / "active.bundle"

    def load(self, trusted_pem: bytes, now: _dt.datetime | None = None) -> Bundle | None:
        """The stored bundle, verified again (a bundle that expired since, or a key rotated, is not
        used); None when there is none."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BundleError(f"cannot read the last good bundle {self.path}: {exc.strerror}") from None
        return verify_bundle(raw, trusted_pem=trusted_pem, now=now)

    def save(self, bundle: Bundle) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path, bundle.raw)


# --------------------------------------------------------------------------- helpers

def _read_members(raw: bytes) -> dict[str, bytes]:
    try:
        tar = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
        infos = tar.getmembers()
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise BundleError(f"not a bundle (a tar archive): {exc}") from None
    if len(infos) > MAX_MEMBERS:
        raise BundleError(f"bundle has {len(infos)} members, over the limit of {MAX_MEMBERS}")
    out: dict[str, bytes] = {}
    for info in infos:
        name = info.name
        parts = name.split("/")
        if not info.isfile() or name.startswith("/") or ".." in parts or "" in parts or len(parts) > 2:
            raise BundleError(f"bundle member {name!r} is not a plain file under the bundle")
        if name in out:
            raise BundleError(f"bundle member {name!r} appears twice")
        f = tar.extractfile(info)
        out[name] = f.read() if f is not None else b""
    return out


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _rfc3339(t: _dt.datetime) -> str:
    if t.tzinfo is None:
        raise BundleError("not-after needs a time zone")
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ed25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BundleError("signing and verifying bundles needs the 'cryptography' package "
                          "(pip install 'policyc[bundle]')") from None
    return ed25519


def _load_private(pem: bytes):
    ed = _ed25519()
    from cryptography.hazmat.primitives import serialization as ser

    try:
        key = ser.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"the signing key is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ed.Ed25519PrivateKey):
        raise BundleError("the signing key is not an Ed25519 key")
    return key


def _load_public(pem: bytes):
    ed = _ed25519()
    from cryptography.hazmat.primitives import serialization as ser

    try:
        key = ser.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"the trusted key is not a PEM public key: {exc}") from None
    if not isinstance(key, ed.Ed25519PublicKey):
        raise BundleError("the trusted key is not an Ed25519 public key")
    return key
