"""What shipping the decision log costs the answering loop: requests/s with and without a shipper.

The enforcer of `bench/fastpath.py` (the kernel-integrity example with N extra regions on a ring
kept full in C with the recorded storm), its decision log:

* ``file``: written to a file (the native engine writes each batch to its descriptor);
* ``follow_syslog``: the same, and a shipper process (runtime/log_shipping.py) follows the file
  and sends every record as RFC 5424 over UDP to a socket of this script's (never read: the
  kernel drops what does not fit, as a slow daemon would lose it);
* ``pipe_syslog``: the log's descriptor is a pipe to the shipper (`--syslog` without `--log`);
* ``pipe_ocsf``: the pipe, the shipper writing OCSF events to a file (`--log-format ocsf`).

Modes run in turn, `--repeat` times; the median of each is reported. The shipper competes for
the CPUs: quote `uptime` (printed as load_average) beside the figures.

    python bench/ship_cost.py [--regions 1000] [--events 200000] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fastpath  # noqa: E402

from policyc.runtime.decision_log import DecisionLog  # noqa: E402
from policyc.runtime.enforce import Enforcer  # noqa: E402
from policyc.runtime.log_shipping import ShipperProcess, pipe_for_log  # noqa: E402
from policyc.runtime.output_file import OutputFile  # noqa: E402

MODES = ("file", "follow_syslog", "pipe_syslog", "pipe_ocsf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regions", type=int, default=1000)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        where = Path(tmp)
        udp.bind(("127.0.0.1", 0))
        plan, symbols = fastpath.compiled(fastpath.policy_with_regions(args.regions, where))
        sc_path = fastpath.scenario(300, args.regions, where)
        requests = fastpath.record(plan, symbols, sc_path, where)
        runs: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.repeat):
            for mode in MODES:
                runs[mode].append(_run(plan, symbols, sc_path, requests, args.events, where, mode,
                                       udp.getsockname()[1]))
    out = {"regions": args.regions, "events": args.events, "repeat": args.repeat,
           **{f"{m}_per_s": round(statistics.median(v)) for m, v in runs.items()},
           "runs": {m: [round(x) for x in v] for m, v in runs.items()},
           "load_average": [round(x, 2) for x in os.getloadavg()]}
    print("; ".join(f"{m} {out[m + '_per_s']:,}/s" for m in MODES) + f"; load {out['load_average']}",
          file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def _run(plan: dict, symbols: list, sc_path: Path, requests: list[bytes], events: int, where: Path, mode: str,
         port: int) -> float:
    backend = fastpath.ReplayBackend(fastpath.build_scenario(fastpath.load_scenario(sc_path), record=False),
                                     requests, events)
    path = where / "decisions.jsonl"
    path.unlink(missing_ok=True)
    syslog = {"kind": "syslog", "address": f"udp://127.0.0.1:{port}", "policy": "bench", "guest": "bench", "pid": 1}
    ocsf = {"kind": "ocsf", "path": str(where / "decisions.ocsf.jsonl"), "rotation": None,
            "context": {"policy": "bench", "guest_name": "bench", "guest_uuid": None, "version": ""}}
    if mode.startswith("pipe"):
        read_end, writer = pipe_for_log()
        log = DecisionLog(writer, plan_hash=plan["content_hash"])
        shipper = ShipperProcess({"input": {"fd": read_end}, "outputs": [syslog if mode == "pipe_syslog" else ocsf]},
                                 pass_fds=(read_end,), writer=writer)
        os.close(read_end)
        log.close_after(shipper)
    else:
        log = DecisionLog(OutputFile(path, "the decision log"), plan_hash=plan["content_hash"])
        if mode == "follow_syslog":
            log.close_after(ShipperProcess({"input": {"follow": str(path), "offset": 0}, "outputs": [syslog]}))
    enforcer = Enforcer(plan, backend, symbols, guest="bench", log=log, state_dir=where / "state")
    enforcer.start()
    t0 = time.perf_counter()
    while not backend.done():
        enforcer.service()
    elapsed = time.perf_counter() - t0
    enforcer.stop()
    log.close()
    assert enforcer.requests == enforcer.responses == enforcer.records == events, enforcer.counters()
    return events / elapsed


if __name__ == "__main__":
    raise SystemExit(main())
