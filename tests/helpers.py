"""Helpers shared by the tests of more than one guest layout.

Imported as ``helpers``: tests/ is not a package, so pytest's default import mode puts this folder
on sys.path for the test modules.
"""

from __future__ import annotations

import json
from pathlib import Path

from policyc.runtime.sim import SimulatedXen

PAGE = 4096


def expected_frames(xen: SimulatedXen, va: int, size: int) -> list[tuple[int, int, int]]:
    """(gfn, first, last) per page of [va, va+size), by the simulated hardware's walker.

    The binders' walkers are what the tests check, so the expectation comes from `Guest.walk`,
    separate code from them."""
    out = []
    cr3 = xen.vcpu(0).cr3
    end = va + size
    while va < end:
        n = min(end - va, PAGE - (va & (PAGE - 1)))
        pa = xen.guest.walk(cr3, va).pa
        out.append((pa >> 12, pa & 0xFFF, (pa & 0xFFF) + n - 1))
        va += n
    return out


def reads_missing_field(plan: dict, placeholder: str, missing: str) -> dict:
    """The plan with `placeholder` register reads turned into reads of `missing`, a field Xen's request
    does not carry. The checker refuses such a policy, but a plan from another compiler version (or an
    edited one) may still hold one: the engine must answer anyway."""
    text = json.dumps(plan).replace(json.dumps(["field", placeholder]), json.dumps(["field", missing]))
    return json.loads(text)


def storm_scenario(where: Path, count: int) -> Path:
    """tests/data/scenarios/storm.yaml with `count` rounds of 7 requests, written into `where`."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "tests" / "data" / "scenarios" / "storm.yaml").read_text().replace("count: 1000", f"count: {count}")
    path = where / "storm.yaml"
    path.write_text(text.replace("../../../examples/", f"{root}/examples/"))
    return path


def run_storm_on_simhost(where: Path, rounds: int, run_args: list[str]) -> int:
    """`policyc run` of the kernel-integrity example (with `run_args`) on a simhost guest that runs
    the storm `rounds` times once the plan is installed; the run ends with it. Returns the requests
    the run reported (it must exit 0)."""
    import re
    import subprocess
    import sys
    import time

    from policyc.runtime.sim.host import connect

    root = Path(__file__).resolve().parents[1]
    sock = str(where / "host.sock")
    host_proc = subprocess.Popen([sys.executable, "-m", "policyc.runtime.sim.host", str(storm_scenario(where, rounds)),
                                  "--socket", sock, "--no-start"], stdout=subprocess.PIPE, text=True)
    enf = None
    try:
        assert host_proc.stdout.readline().strip() == "ready"
        host = connect(sock)
        enf = subprocess.Popen([sys.executable, "-m", "policyc", "run",
                                str(root / "examples" / "policies" / "linux-kernel-integrity.vmi"),
                                "--guest", f"simhost:{sock}", "--state-dir", str(where / "state"), *run_args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while host.monitors() == {}:                 # installed
            assert time.monotonic() < deadline and enf.poll() is None, "the plan was not installed"
            time.sleep(0.05)
        host.start_workload()
        _out, err = enf.communicate(timeout=300)     # the workload ends: the run tears down and exits
        assert enf.returncode == 0, err
    finally:
        if enf is not None and enf.poll() is None:
            enf.kill()
        host_proc.terminate()
        host_proc.wait(10)
    return int(re.search(r"requests (\d+), responses (\d+), decision records (\d+)", err)[1])


def start_simhost(scenario, socket_path: str):
    """`python -m policyc.runtime.sim.host SCENARIO --forever --no-start` on `socket_path`, once it serves."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "policyc.runtime.sim.host", str(scenario), "--socket",
                             socket_path, "--forever", "--no-start"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


class BundleServer:
    """A static HTTP server on 127.0.0.1 serving one body (a bundle) with ETags, as nginx or an object
    store would: `body` is what it serves (None: 404); `answers` notes each request's If-None-Match
    and the status sent. `close()` stops it; `reopen()` serves again on the same port."""

    def __init__(self, port: int = 0) -> None:
        import http.server
        import threading

        self.body: bytes | None = None
        self.answers: list[tuple[str | None, int]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                asked = self.headers.get("If-None-Match")
                body = outer.body
                if body is None:
                    outer.answers.append((asked, 404))
                    self.send_error(404)
                    return
                import hashlib

                etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
                if asked == etag:
                    outer.answers.append((asked, 304))
                    self.send_response(304)
                    self.end_headers()
                    return
                outer.answers.append((asked, 200))
                self.send_response(200)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/host.bundle"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def statuses(self) -> list[int]:
        return [status for _asked, status in self.answers]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reopen(self) -> "BundleServer":
        """A server on this one's port, serving its body (after `close`)."""
        again = BundleServer(self.port)
        again.body = self.body
        return again


def http_get(url: str) -> tuple[int, str]:
    """The status and body of a GET (an HTTP error status too, not an exception)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(predicate, timeout: float = 60.0, what: str = "") -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds, naming `what`."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        time.sleep(0.05)


def tar_members(raw: bytes) -> dict[str, bytes]:
    """The members of a tar archive (a bundle) by name."""
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def tar_of(members: dict[str, bytes], extra=None) -> bytes:
    """A tar archive of `members` (and one more `extra` TarInfo as it is: a link, say)."""
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            tar.addfile(extra)
    return out.getvalue()


def flip_bit(data: bytes, at: int = -10) -> bytes:
    b = bytearray(data)
    b[at] ^= 1
    return bytes(b)
