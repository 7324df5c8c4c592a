"""`--log-format ocsf`: the decision log as OCSF 1.8.0 events (Open Cybersecurity Schema Framework).

`ocsf_events(record, context)` maps one decision-log record (the JSON object `DecisionLog` or the
native engine renders) to OCSF events, each a JSON object:

* a ``mem_access`` decision → **Memory Activity** (class 1004, System Activity): activity Read (7),
  Write (8) or Other (99, "Execute") from the access bits; ``base_address`` the guest linear
  address (else the guest physical one);
* any other decision (control register, MSR, breakpoint, CPUID, descriptor, guest request) and
  the records that are not decisions (rebind, effect_error) → **Base Event** (class 0), activity
  Other (99) named by the kind: OCSF has no class for a trapped register write;
* every alert message of a decision → one **Detection Finding** (class 2004, Findings), after its
  decision's event: ``finding_info.analytic`` is the rule (type Rule), the title the rendered
  message, the severity the rule's.

Every event carries the `host` and `security_control` profiles: ``action_id`` Allowed (1) or
Denied (2), ``disposition_id`` Allowed (1), Blocked (2) or Detected (15, audit mode's would-deny),
and ``policy`` {name: the policy, uid: the plan hash}; ``device`` is the guest (type Virtual, uid its
Xen UUID when the backend knows it, name its domain name); ``metadata.uid`` the decision id; and
``unmapped.policyc`` is the decision-log record itself (rule, rules, verdict, would_deny, kind, vcpu,
event, messages, ...). The guest process is not visible from the hypervisor: ``process`` (and
``actor.process``) name the vCPU the access came from (``uid`` "vcpu:N").

Guest-controlled text was escaped when the record was rendered; it is carried as it is.
The test (tests/test_log_shipping.py) validates events against JSON Schemas generated from the
published OCSF 1.8.0 schema by the `ocsf-json-schema` package.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

__all__ = ["OCSF_VERSION", "OcsfContext", "ocsf_events", "ocsf_lines"]

OCSF_VERSION = "1.8.0"
MEMORY_ACTIVITY, BASE_EVENT, DETECTION_FINDING = 1004, 0, 2004
_ACCESS_R, _ACCESS_W, _ACCESS_X = 1, 2, 4
_SEVERITY = {"info": 1, "low": 2, "medium": 3, "high": 4, "critical": 5}
_SEVERITY_NAME = {1: "Informational", 2: "Low", 3: "Medium", 4: "High", 5: "Critical"}
_ENCODE = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


@dataclass(frozen=True)
class OcsfContext:
    """What every event says besides its record: the policy, the guest, the product."""

    policy: str
    guest_name: str
    guest_uuid: str | None = None
    version: str = ""

    def device(self) -> dict[str, Any]:
        return {"type_id": 6, "type": "Virtual", "name": self.guest_name, "uid": self.guest_uuid or self.guest_name}

    def metadata(self, uid: str, log_name: str) -> dict[str, Any]:
        return {"version": OCSF_VERSION, "uid": uid, "log_name": log_name, "profiles": ["host", "security_control"],
                "product": {"name": "policyc", "vendor_name": "policyc", "version": self.version or "unknown"}}


def ocsf_lines(lines: Iterable[str], context: OcsfContext) -> str:
    """JSON Lines of decision-log records → JSON Lines of OCSF events (see `ocsf_events`). The
    record's own text becomes ``unmapped.policyc`` as it is (spliced in, not encoded again)."""
    out = []
    for line in lines:
        if line:
            tail = ',"unmapped":{"policyc":' + line + "}}"
            out.extend(_ENCODE(e)[:-1] + tail for e in ocsf_events(json.loads(line), context, unmapped=False))
    return "\n".join(out) + "\n" if out else ""


def ocsf_events(record: Mapping[str, Any], context: OcsfContext, *, unmapped: bool = True) -> list[dict[str, Any]]:
    """The OCSF events for one decision-log record (see the module docstring); ``unmapped=False``
    leaves ``unmapped`` out (`ocsf_lines` adds the record's text)."""
    if "record" in record:
        events = [_base_event(record, context, str(record["record"]), uid=f"{record['record']}@{record['time']}")]
    else:
        controls = _security_controls(record, context)
        kind = record["kind"]
        if kind == "mem_access":
            events = [_activity(record, context, controls)]
        else:
            events = [{**_base_event(record, context, kind, uid=record["decision_id"]), **controls}]
        alerts = [m for m in record.get("messages", ()) if m["kind"] == "alert"]
        for n, m in enumerate(alerts):
            events.append(_finding(record, m, n, context, controls))
    if unmapped:
        for e in events:
            e["unmapped"] = {"policyc": dict(record)}
    return events


# --------------------------------------------------------------------------- classes

def _activity(record: Mapping[str, Any], context: OcsfContext, controls: Mapping[str, Any]) -> dict[str, Any]:
    event = record.get("event", {})
    access = int(event.get("access", 0))
    if access & _ACCESS_W:
        activity, name = 8, "Write"
    elif access & _ACCESS_R:
        activity, name = 7, "Read"
    else:
        activity, name = 99, "Execute" if access & _ACCESS_X else "Other"
    if event.get("gla_valid") and "gla" in event:
        address = event["gla"]
    else:
        address = hex((int(event.get("gfn", "0x0"), 16) << 12) | int(event.get("offset", "0x0"), 16))
    process = {"uid": f"vcpu:{record['vcpu']}", "name": f"vcpu {record['vcpu']}"}
    severity = _severity(record)
    return {
        "class_uid": MEMORY_ACTIVITY, "class_name": "Memory Activity", "category_uid": 1,
        "category_name": "System Activity", "activity_id": activity, "activity_name": name,
        "type_uid": MEMORY_ACTIVITY * 100 + activity, "type_name": f"Memory Activity: {name}",
        "time": _epoch_ms(record["time"]), "severity_id": severity, "severity": _SEVERITY_NAME[severity],
        "message": _message(record), "metadata": context.metadata(record["decision_id"], "decisions"),
        "device": context.device(), "process": process, "actor": {"process": process},
        "base_address": address, **controls
    }


def _base_event(record: Mapping[str, Any], context: OcsfContext, name: str, *, uid: str) -> dict[str, Any]:
    severity = _severity(record) if "verdict" in record else 1
    return {
        "class_uid": BASE_EVENT, "class_name": "Base Event", "category_uid": 0, "category_name": "Uncategorized",
        "activity_id": 99, "activity_name": name, "type_uid": 99, "type_name": f"Base Event: {name}",
        "time": _epoch_ms(record["time"]), "severity_id": severity, "severity": _SEVERITY_NAME[severity],
        "message": _message(record), "metadata": context.metadata(uid, "decisions"), "device": context.device(),
    }


def _finding(record: Mapping[str, Any], message: Mapping[str, Any], n: int, context: OcsfContext,
             controls: Mapping[str, Any]) -> dict[str, Any]:
    severity = _SEVERITY.get(message["severity"], 3)
    uid = f"{record['decision_id']}#{n}"
    return {
        "class_uid": DETECTION_FINDING, "class_name": "Detection Finding", "category_uid": 2,
        "category_name": "Findings", "activity_id": 1, "activity_name": "Create",
        "type_uid": DETECTION_FINDING * 100 + 1, "type_name": "Detection Finding: Create",
        "time": _epoch_ms(record["time"]), "severity_id": severity, "severity": _SEVERITY_NAME[severity],
        "status_id": 1, "status": "New", "is_alert": True, "message": message["message"],
        "finding_info": {"uid": uid, "title": message["message"],
                         "analytic": {"type_id": 1, "type": "Rule", "name": message["rule"]}},
        "metadata": context.metadata(uid, "alerts"), "device": context.device(), **controls,
    }


# --------------------------------------------------------------------------- fields

def _security_controls(record: Mapping[str, Any], context: OcsfContext) -> dict[str, Any]:
    if record.get("would_deny"):
        action, disposition = (1, "Allowed"), (15, "Detected")
    elif record.get("verdict") == "deny":
        action, disposition = (2, "Denied"), (2, "Blocked")
    else:
        action, disposition = (1, "Allowed"), (1, "Allowed")
    return {"action_id": action[0], "action": action[1], "disposition_id": disposition[0],
            "disposition": disposition[1],
            "policy": {"name": context.policy, "uid": str(record.get("plan_hash", "")), "is_applied": True}}


def _severity(record: Mapping[str, Any]) -> int:
    alerts = [_SEVERITY.get(m["severity"], 3) for m in record.get("messages", ()) if m["kind"] == "alert"]
    if alerts:
        return max(alerts)
    return 3 if record.get("verdict") == "deny" or record.get("would_deny") else 1


def _message(record: Mapping[str, Any]) -> str:
    messages = record.get("messages") or ()
    if messages:
        return messages[0]["message"]
    if "record" in record:
        return str(record["record"])
    verdict = "would deny" if record.get("would_deny") else record.get("verdict", "")
    return f"{verdict} {record.get('kind', '')}" + (f" by rule {record['rule']}" if record.get("rule") else "")


def _epoch_ms(iso: str) -> int:
    t = _dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return int(t.timestamp() * 1000)
