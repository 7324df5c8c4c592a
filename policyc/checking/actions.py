"""A rule's actions: verdicts, reports and their message templates, pauses, rate limits, its priority.

`_action` dispatches on the action's type through `_ACTIONS`.
"""

from __future__ import annotations

import re
import string
from typing import Callable

from .. import model as M
from .. import syntax as S
from ..arch import EVENT_FIELDS, EXCEPTION_VECTORS, SEVERITIES
from ..diagnostics import did_you_mean
from ..plan import MAX_FORMAT_WIDTH, format_width_over_bound
from .constants import fold
from .context import Checking, RuleContext, kind_words

__all__ = ["check_actions", "META_TEMPLATE_FIELDS"]

META_TEMPLATE_FIELDS = ("rule", "verdict", "policy", "domain", "time", "decision")


def check_actions(chk: Checking, r: S.Rule, ctx: RuleContext | None) -> tuple[list[M.Action], int]:
    """A rule's actions in model form and its priority (0 unless given); one verdict per rule."""
    if len(r.actions) == 1 and type(r.actions[0]) is not S.Priority:
        # Most rules: one action, so one verdict at most (a limit's is its action's) and no priority.
        action = _action(chk, r.actions[0], ctx, [])
        return ([] if action is None else [action]), 0
    out: list[M.Action] = []
    priority = 0
    priorities = [a for a in r.actions if type(a) is S.Priority]
    for dup in priorities[1:]:
        chk.d.error("PC316", dup.span, "priority is set twice in one rule")
    if priorities:
        v = fold(chk, priorities[0].value)
        if isinstance(v, int):
            priority = v
        elif v is not None:
            chk.d.error("PC400", priorities[0].value.span, "a priority is a number")
    verdicts: list[S.Action] = []
    for a in r.actions:
        if type(a) is S.Priority:
            continue
        action = _action(chk, a, ctx, verdicts)
        if action is not None:
            out.append(action)
    kinds = {type(v) for v in verdicts}
    if S.Allow in kinds and S.Deny in kinds:
        chk.d.error("PC413", verdicts[-1].span, "this rule says both allow and deny",
                    "a rule has one verdict; split it into two rules with conditions that tell them apart")
    return out, priority


def _action(chk: Checking, a: S.Action, ctx: RuleContext | None, verdicts: list) -> M.Action | None:
    """One action in model form; the verdicts met are added to `verdicts`."""
    check = _ACTIONS.get(type(a))
    if check is None:
        raise TypeError(a)
    return check(chk, a, ctx, verdicts)


def _allow(chk: Checking, a: S.Allow, ctx: RuleContext | None, verdicts: list) -> M.Action | None:
    verdicts.append(a)
    return M.Verdict("allow", span=a.span)


def _deny(chk: Checking, a: S.Deny, ctx: RuleContext | None, verdicts: list) -> M.Action | None:
    verdicts.append(a)
    feed = None
    if a.feed is not None and ctx is not None and ctx.kind != "memory":
        chk.d.error("PC400", a.span, "'deny feed' gives data to a denied memory read; this is no memory trigger")
    if a.exception is not None and ctx is not None and ctx.kind not in ("memory", "breakpoint"):
        chk.d.error("PC400", a.span, "'deny with' injects an exception for a denied execute; "
                    f"{kind_words(ctx.kind)} writes are refused without one")
    if a.feed is not None:
        try:
            feed = a.feed.encode("latin-1")
        except UnicodeEncodeError:
            chk.d.error("PC113", a.span, "fed bytes must be \\x00-\\xff", "write bytes as \\xNN")
    if a.exception is not None and a.exception not in EXCEPTION_VECTORS:
        chk.d.error("PC414", a.span, f"unknown exception vector '{a.exception}'",
                    did_you_mean(a.exception, EXCEPTION_VECTORS) or "e.g. #UD or #GP")
    return M.Verdict("deny", feed, a.exception, a.span)


def _report(chk: Checking, a: S.Report, ctx: RuleContext | None, verdicts: list) -> M.Action | None:
    if a.severity not in SEVERITIES:
        chk.d.error("PC415", a.span, f"unknown severity '{a.severity}'",
                    did_you_mean(a.severity, SEVERITIES) or f"severities: {' '.join(SEVERITIES)}")
    fields = _template(chk, a, ctx)
    return M.LogAction(a.kind, a.severity, a.template, tuple(fields), a.span)


def _limit(chk: Checking, a: S.Limit, ctx: RuleContext | None, verdicts: list) -> M.Action | None:
    rate = fold(chk, a.rate)
    then = _action(chk, a.then, ctx, verdicts)
    if not isinstance(rate, int) or rate <= 0:
        if rate is not None:
            chk.d.error("PC416", a.rate.span, "a rate limit must be a positive number of events per second")
        return None
    return M.RateLimit(rate, then, a.span) if then is not None else None


_ACTIONS: dict[type, Callable[[Checking, S.Action, RuleContext | None, list], M.Action | None]] = {
    S.Allow: _allow,
    S.Deny: _deny,
    S.Report: _report,
    S.Pause: lambda chk, a, ctx, verdicts: M.Pause(a.span),
    S.Disarm: lambda chk, a, ctx, verdicts: M.Disarm(a.span),
    S.Limit: _limit,
}


def _template(chk: Checking, a: S.Report, ctx: RuleContext | None) -> list[str]:
    """The fields a message template uses, each one the event carries, with a bounded number format.
    A template found sound for a kind of event is not parsed again for another rule of that kind."""
    key = (a.template, None if ctx is None else ctx.kind)
    known = chk.sound_templates.get(key)
    if known is not None:
        return list(known)
    found, sound = _template_fields(chk, a, ctx)
    if sound:
        chk.sound_templates[key] = tuple(found)
    return found


def _template_fields(chk: Checking, a: S.Report, ctx: RuleContext | None) -> tuple[list[str], bool]:
    """`_template`'s fields, and whether the template is sound (no error reported of it)."""
    allowed = list(META_TEMPLATE_FIELDS) + list(chk.arch.registers)
    if ctx is not None:
        allowed += list(EVENT_FIELDS[ctx.kind])
    found: list[str] = []
    try:
        parsed = list(string.Formatter().parse(a.template))
    except ValueError as exc:
        chk.d.error("PC410", a.template_span, f"malformed message template: {exc}",
                    "fields are written {name} or {name:#x}; a literal brace is {{ or }}")
        return [], False
    sound = True
    for _, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", field_name) or conversion:
            chk.d.error("PC410", a.template_span, f"'{{{field_name}}}' is not a field reference",
                        "fields are written {name} or {name:#x}")
            sound = False
            continue
        if field_name not in allowed:
            chk.d.error("PC409", a.template_span, f"the message uses '{{{field_name}}}', which "
                        f"{kind_words(ctx.kind) if ctx else 'this'} events do not carry",
                        did_you_mean(field_name, allowed))
            sound = False
            continue
        too_wide = format_width_over_bound(spec or "")
        if too_wide:
            chk.d.error("PC410", a.template_span, f"'{spec}' pads to {too_wide} characters",
                        f"a field's width and precision are at most {MAX_FORMAT_WIDTH}: each record "
                        "is written per event")
            sound = False
            continue
        try:
            format(0, spec or "")
        except ValueError:
            chk.d.error("PC410", a.template_span, f"'{spec}' is not a number format", "e.g. {gla:#x} or {vcpu}")
            sound = False
            continue
        found.append(field_name)
    return list(dict.fromkeys(found)), sound
