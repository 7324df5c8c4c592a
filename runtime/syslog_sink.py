"""`--syslog ADDR`: every decision record sent to a syslog daemon as an RFC 5424 message.

ADDR is ``udp://HOST:PORT`` (the default scheme; one datagram a record) or ``tcp://HOST:PORT``
(octet-counting framing, RFC 6587 §3.4.1: ``LEN SP MESSAGE``; reconnected when the connection
drops). A message:

    <PRI>1 TIMESTAMP HOSTNAME policyc PID MSGID [policyc@32473 policy="..." rule="..."
    verdict="..." plan_hash="..." guest="..."] {the decision-log record, JSON}

PRI is facility local0 with the severity of the record: the strongest alert's (critical 2, high 3,
medium 4, low 5, info 6), else warning (4) for a deny, notice (5) for a would-deny, info (6) for an
allow. TIMESTAMP is the decision's time (UTC, microseconds); MSGID the kind (mem_access,
write_ctrlreg, ...) or the record type (rebind); the structured data's values are escaped as RFC
5424 §6.3.3 says. 32473 is the enterprise number RFC 5612 reserves for documentation: policyc has
no number of its own. MSG is the record as the decision log has it (ASCII: its guest-controlled
text is escaped), so a collector can parse it as JSON.

Sending runs in the shipper process (runtime/log_shipping.py), whose syslog queue drops (and
counts) when the daemon cannot keep up: a syslog daemon that is down must not hold a guest's vCPUs. rsyslog and syslog-ng accept records
of 8 KiB by default; a longer record (many messages) needs their maximum message size raised.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Mapping

from ..errors import PolicycError

__all__ = ["SyslogError", "SyslogSender", "parse_syslog_address", "rfc5424"]

FACILITY_LOCAL0 = 16
ENTERPRISE = 32473
_ALERT_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5, "info": 6}


class SyslogError(PolicycError, OSError):
    """A record could not be sent (counted as "syslog_send"); says where, without the errno prefix."""

    reason = "send"

    def __str__(self) -> str:
        return str(self.strerror)


def parse_syslog_address(text: str) -> tuple[str, str, int]:
    """``[udp://|tcp://]HOST:PORT`` → (transport, host, port), or a ValueError saying why."""
    transport, sep, rest = text.partition("://")
    if not sep:
        transport, rest = "udp", text
    host, sep, port = rest.rpartition(":")
    if transport not in ("udp", "tcp") or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected udp://HOST:PORT or tcp://HOST:PORT, not '{text}'")
    return transport, host.strip("[]"), int(port)


def rfc5424(record: Mapping[str, Any], line: str, *, hostname: str, pid: int, policy: str, guest: str) -> bytes:
    """One RFC 5424 message for a decision-log record (`line` is its JSON text)."""
    pri = FACILITY_LOCAL0 * 8 + _severity(record)
    msgid = str(record.get("kind") or record.get("record") or "-")[:32]
    params = {"policy": policy, "rule": record.get("rule") or "", "verdict": _verdict(record),
              "plan_hash": record.get("plan_hash", ""), "guest": guest}
    sd = " ".join(f'{k}="{_sd_escape(str(v))}"' for k, v in params.items())
    return (f"<{pri}>1 {record.get('time', '-')} {hostname} policyc {pid} {msgid} "
            f"[policyc@{ENTERPRISE} {sd}] {line}").encode("utf-8")


class SyslogSender:
    """Sends records to a syslog daemon (in the shipper process, runtime/log_shipping.py)."""

    def __init__(self, address: str, *, policy: str, guest: str, pid: int) -> None:
        self.transport, self.host, self.port = parse_syslog_address(address)
        self.policy = policy
        self.guest = guest
        self.hostname = (socket.gethostname() or "-").split(".")[0][:255]
        self.pid = pid
        self._sock: socket.socket | None = None
        self._connect()             # fails at start (a usage error), not in the middle of a run

    def send(self, lines: list[str]) -> None:
        """Send one batch of decision-log records; raises `SyslogError` (reason "send")."""
        messages = [rfc5424(json.loads(line), line, hostname=self.hostname, pid=self.pid, policy=self.policy,
                            guest=self.guest) for line in lines if line]
        try:
            if self._sock is None:
                self._connect()
            assert self._sock is not None
            if self.transport == "udp":
                for m in messages:
                    self._sock.send(m)
            else:
                self._sock.sendall(b"".join(b"%d %s" % (len(m), m) for m in messages))
        except OSError as exc:
            if self._sock is not None and self.transport == "tcp":
                self._sock.close()
                self._sock = None         # reconnect with the next batch
            raise SyslogError(exc.errno, f"cannot send to {self.transport}://{self.host}:{self.port}: "
                                         f"{exc.strerror or exc}") from None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        sock = socket.socket(family, kind)
        try:
            sock.connect((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise SyslogError(exc.errno, f"cannot reach the syslog daemon at {self.transport}://{self.host}:"
                                         f"{self.port}: {exc.strerror or exc}") from None
        self._sock = sock


def _severity(record: Mapping[str, Any]) -> int:
    alerts = [_ALERT_SEVERITY.get(m.get("severity"), 4) for m in record.get("messages", ()) if m.get("kind") == "alert"]
    if alerts:
        return min(alerts)
    if record.get("would_deny"):
        return 5
    return 4 if record.get("verdict") == "deny" else 6


def _verdict(record: Mapping[str, Any]) -> str:
    return "would_deny" if record.get("would_deny") else str(record.get("verdict", ""))


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
