"""`policyc lsp`: a Language Server (stdio) for `.vmi` and policy `.yaml` files.

The protocol side only: every answer comes from `policyc.authoring`, which
checks a buffer with the compiler itself. A document is re-analysed on open,
change and save; diagnostics carry the compiler's codes, ranges and hints,
and a hint naming replacements ("did you mean 'sys_call_table'?") becomes a
quick fix. Needs the `lsp` extra (pygls, lsprotocol).

LSP positions are 0-based and their end is exclusive; `Span`s are 1-based
and inclusive. Columns are counted in characters, which equals LSP's UTF-16
units for everything outside strings and comments on the same line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .version import __version__
from .authoring import Analysis, analyze, complete, definition, hover, replacements
from .diagnostics import Diagnostic, Severity, Span

__all__ = ["build_server", "main", "to_lsp_diagnostic"]

SOURCE = "policyc"


def main() -> int:
    """Serve over stdin/stdout until the client says exit."""
    try:
        server = build_server()
    except ImportError as exc:
        import sys
        print(f"policyc lsp: needs pygls and lsprotocol ({exc.name} is missing): "
              "pip install 'policyc[lsp]'", file=sys.stderr)
        return 2
    server.start_io()
    return 0


def build_server():
    """A pygls server wired to the authoring functions (imported here: pygls is an optional extra)."""
    from lsprotocol import types as T
    from pygls.lsp.server import LanguageServer

    server = LanguageServer("policyc", __version__, text_document_sync_kind=T.TextDocumentSyncKind.Full)
    analyses: dict[str, Analysis] = {}

    def refresh(uri: str) -> None:
        document = server.workspace.get_text_document(uri)
        analysis = analyze(document.source, _path_of(uri))
        analyses[uri] = analysis
        diagnostics = [to_lsp_diagnostic(d, analysis) for d in analysis.diagnostics]
        server.text_document_publish_diagnostics(T.PublishDiagnosticsParams(
            uri=uri, version=document.version, diagnostics=[_lsp(T, d) for d in diagnostics]))

    def current(uri: str) -> Analysis:
        if uri not in analyses:
            refresh(uri)
        return analyses[uri]

    @server.feature(T.TEXT_DOCUMENT_DID_OPEN)
    def did_open(params: T.DidOpenTextDocumentParams) -> None:
        refresh(params.text_document.uri)

    @server.feature(T.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(params: T.DidChangeTextDocumentParams) -> None:
        refresh(params.text_document.uri)

    @server.feature(T.TEXT_DOCUMENT_DID_SAVE)
    def did_save(params: T.DidSaveTextDocumentParams) -> None:
        refresh(params.text_document.uri)

    @server.feature(T.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(params: T.DidCloseTextDocumentParams) -> None:
        analyses.pop(params.text_document.uri, None)
        server.text_document_publish_diagnostics(T.PublishDiagnosticsParams(uri=params.text_document.uri,
                                                                           diagnostics=[]))

    @server.feature(T.TEXT_DOCUMENT_HOVER)
    def on_hover(params: T.HoverParams) -> T.Hover | None:
        text = hover(current(params.text_document.uri), params.position.line + 1, params.position.character + 1)
        if text is None:
            return None
        return T.Hover(contents=T.MarkupContent(kind=T.MarkupKind.Markdown, value=text))

    kinds = {"keyword": T.CompletionItemKind.Keyword, "region": T.CompletionItemKind.Variable,
             "constant": T.CompletionItemKind.Constant, "register": T.CompletionItemKind.Field,
             "msr": T.CompletionItemKind.Field, "symbol": T.CompletionItemKind.Reference,
             "field": T.CompletionItemKind.Property, "value": T.CompletionItemKind.EnumMember}

    @server.feature(T.TEXT_DOCUMENT_COMPLETION, T.CompletionOptions(trigger_characters=["."]))
    def on_completion(params: T.CompletionParams) -> T.CompletionList:
        # Every change is analysed as it arrives (full sync, in order), so this is the editor's text.
        found, cut = complete(current(params.text_document.uri), params.position.line + 1,
                              params.position.character + 1)
        return T.CompletionList(is_incomplete=cut, items=[
            T.CompletionItem(label=c.label, kind=kinds.get(c.kind), detail=c.detail or None) for c in found])

    @server.feature(T.TEXT_DOCUMENT_DEFINITION)
    def on_definition(params: T.DefinitionParams) -> T.Location | None:
        found = definition(current(params.text_document.uri), params.position.line + 1,
                           params.position.character + 1)
        if found is None:
            return None
        path, span = found
        start = T.Position(line=span.line - 1, character=span.col - 1)
        return T.Location(uri=path.resolve().as_uri(), range=T.Range(start=start, end=start))

    @server.feature(T.TEXT_DOCUMENT_FORMATTING)
    def on_formatting(params: T.DocumentFormattingParams) -> list[T.TextEdit] | None:
        document = server.workspace.get_text_document(params.text_document.uri)
        return _formatting_edits(T, document.source, len(document.lines), _path_of(params.text_document.uri))

    @server.feature(T.TEXT_DOCUMENT_CODE_ACTION,
                    T.CodeActionOptions(code_action_kinds=[T.CodeActionKind.QuickFix]))
    def on_code_action(params: T.CodeActionParams) -> list[T.CodeAction]:
        return _quick_fixes(T, params, current(params.text_document.uri))

    return server


def to_lsp_diagnostic(d: Diagnostic, analysis: Analysis) -> dict[str, Any]:
    """One diagnostic as LSP's fields (0-based, end exclusive). One in an included file is shown on
    the buffer's include that leads to it (else at the top), naming where it is, so it is not lost."""
    severity = {Severity.ERROR: 1, Severity.WARNING: 2, Severity.NOTE: 3}[d.severity]
    message = d.message + (f"\nhint: {d.hint}" if d.hint else "")
    out: dict[str, Any] = {"code": d.code, "severity": severity, "source": SOURCE}
    if d.span is None or d.span.file != analysis.shown:
        at = analysis.include_leading_to(d.span.file) if d.span else None
        out.update(range=_range(at, analysis.text) if at else (0, 0, 0, 1),
                   message=(f"{d.span}: " if d.span else "") + message)
        return out
    out.update(range=_range(d.span, analysis.text), message=message)
    fix = replacements(d)
    if fix is not None:
        wrong, names = fix
        name_range = _name_range(wrong, out["range"], analysis.text)
        if name_range is not None:
            out["data"] = {"replacements": names, "name_range": list(name_range)}
    return out


# ---------------------------------------------------------------- helpers

def _formatting_edits(T, text: str, line_count: int, path: Path) -> list | None:
    """The whole document replaced by `policyc fmt`'s layout; None when it does not parse."""
    from .fmt import FormatError, check_format

    try:
        formatted, changed = check_format(text, str(path))
    except FormatError:
        return None  # the diagnostics already say why it does not parse
    if not changed:
        return []
    whole = T.Range(start=T.Position(line=0, character=0), end=T.Position(line=line_count, character=0))
    return [T.TextEdit(range=whole, new_text=formatted)]


def _quick_fixes(T, params, analysis: Analysis) -> list:
    """A "replace with" action per name a diagnostic's hint offers. The fixes come from this server's own
    analysis, matched by code and range: a client need not send back a diagnostic's `data`."""
    ours = {(d["code"], d["range"]): d.get("data") for d in
            (to_lsp_diagnostic(x, analysis) for x in analysis.diagnostics)}
    uri = params.text_document.uri
    actions = []
    for d in params.context.diagnostics:
        key = (d.code, (d.range.start.line, d.range.start.character, d.range.end.line, d.range.end.character))
        data = ours.get(key) or {}
        for name in data.get("replacements", []):
            a, b, c, e = data["name_range"]
            edit = T.TextEdit(range=T.Range(start=T.Position(line=a, character=b), end=T.Position(line=c, character=e)),
                              new_text=name)
            actions.append(T.CodeAction(title=f"Replace with '{name}'", kind=T.CodeActionKind.QuickFix,
                                        diagnostics=[d], edit=T.WorkspaceEdit(changes={uri: [edit]}),
                                        is_preferred=not actions))
    return actions


def _path_of(uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)


def _range(span: Span, text: str) -> tuple[int, int, int, int]:
    line, col = span.line - 1, span.col - 1
    if span.end_col is not None:
        return line, col, (span.end_line or span.line) - 1, span.end_col
    # A point: widen it to the word there, so the editor underlines something.
    from .authoring import word_at

    word, start, end = word_at(text, span.line, span.col)
    return (line, start - 1, line, end - 1) if word and start == span.col else (line, col, line, col + 1)


def _name_range(name: str, rng: tuple[int, int, int, int], text: str) -> tuple[int, int, int, int] | None:
    """Where `name` stands inside a diagnostic's range (which may cover `symbol NAME`)."""
    lines = text.splitlines()
    line = rng[0]
    if line >= len(lines):
        return None
    stop = rng[3] if rng[2] == line else len(lines[line])
    at = lines[line].rfind(name, rng[1], stop)
    return (line, at, line, at + len(name)) if at >= 0 else None


def _lsp(T, d: dict[str, Any]):
    a, b, c, e = d["range"]
    return T.Diagnostic(range=T.Range(start=T.Position(line=a, character=b), end=T.Position(line=c, character=e)),
                        message=d["message"], severity=T.DiagnosticSeverity(d["severity"]), code=d["code"],
                        source=d["source"], data=d.get("data"))
