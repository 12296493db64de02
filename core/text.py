"""Turn rows into the text a method embeds or scores: one column, a template, or chat messages.

`--text-field COL` takes one string column; `--template "{prompt}\\n{completion}"` formats columns
with Python's format syntax; a `messages` column (a list of {role, content}) is rendered with the
tokenizer's chat template when it has one, else as "role: content" lines. With neither flag the
first of `text`, `messages`, `prompt`+`completion` that exists is used.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass

import numpy as np

from dyn.core.errors import DataError, UsageError
from dyn.core.io import LoadedRows

DEFAULT_PROMPT_COMPLETION = "{prompt}\n{completion}"


@dataclass(frozen=True)
class TextSpec:
    """How to build one text per row; exactly one of the fields is set."""

    field: str | None = None
    template: str | None = None
    messages_field: str | None = None

    def describe(self) -> str:
        if self.field:
            return f"column '{self.field}'"
        if self.template:
            return f"template {self.template!r}"
        return f"chat column '{self.messages_field}'"


def resolve_text_spec(columns: list[str], text_field: str | None, template: str | None, source: str) -> TextSpec:
    """Check the user's choice against the columns that exist, or pick a default."""
    if text_field and template:
        raise UsageError("--text-field and --template are alternatives; give one")
    if text_field:
        if text_field not in columns:
            raise DataError(f"{source}: no column '{text_field}'; columns are: {', '.join(columns)}")
        return TextSpec(messages_field=text_field) if text_field == "messages" else TextSpec(field=text_field)
    if template:
        return TextSpec(template=checked_template(template, columns, source)[0])
    if "text" in columns:
        return TextSpec(field="text")
    if "messages" in columns:
        return TextSpec(messages_field="messages")
    if "prompt" in columns and "completion" in columns:
        return TextSpec(template=DEFAULT_PROMPT_COMPLETION)
    raise UsageError(
        f"{source}: cannot tell which text to use; pass --text-field COLUMN or --template "
        f"'{{a}} {{b}}'; columns are: {', '.join(columns)}"
    )


def unescape_template(template: str) -> str:
    """Read `\\n` and `\\t` typed in a shell (`--template "{prompt}\\n{completion}"`) as newline and tab."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def checked_template(template: str, columns: list[str], source: str) -> tuple[str, list[str]]:
    """`--template` with its \\n and \\t read as newline and tab, and the columns it names; a usage
    error when it names none, a data error naming `source` when a named column does not exist."""
    template = unescape_template(template)
    names = template_fields(template)
    if not names:
        raise UsageError(f"--template {template!r} names no column; write e.g. '{{question}}'")
    missing = [n for n in names if n not in columns]
    if missing:
        raise DataError(
            f"{source}: --template names column(s) {', '.join(missing)} that do not exist; "
            f"columns are: {', '.join(columns)}"
        )
    return template, names


def template_fields(template: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UsageError(f"--template {template!r}: {exc}") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        base = name.split(".")[0].split("[")[0]
        if not base or base.isdigit():
            raise UsageError(f"--template {template!r}: every placeholder must name a column, e.g. {{prompt}}")
        if base not in names:
            names.append(base)
    return names


def extract_texts(
    rows: LoadedRows, spec: TextSpec, *, skip_bad_rows: bool = False, chat_tokenizer=None
) -> tuple[list[str], LoadedRows]:
    """One text per row. Bad rows raise a DataError naming the row, or are dropped and counted.

    Returns the texts and the rows they belong to (fewer rows when some were skipped).
    """
    dataset = rows.dataset
    texts: list[str] = []
    bad = np.zeros(len(dataset), dtype=bool)
    reasons: Counter = Counter()
    if spec.field:
        values = dataset[spec.field]
        render = lambda i: as_text(values[i], spec.field)  # noqa: E731
    elif spec.template:
        names = template_fields(spec.template)
        columns = {n: dataset[n] for n in names}
        render = lambda i: _format_template(spec.template, {n: columns[n][i] for n in names})  # noqa: E731
    else:
        values = dataset[spec.messages_field]
        render = lambda i: render_messages(values[i], chat_tokenizer)  # noqa: E731
    for i in range(len(dataset)):
        try:
            texts.append(render(i))
        except BadText as exc:
            if not skip_bad_rows:
                raise DataError(f"{rows.where(i)}: {exc}; fix it or pass --skip-bad-rows") from None
            bad[i] = True
            reasons[exc.reason] += 1
    if bad.any():
        rows = rows.drop_rows(bad, reasons)
    return texts, rows


class BadText(Exception):
    """A row whose text cannot be used; `reason` is the count key under --skip-bad-rows."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def as_text(value, column: str) -> str:
    if isinstance(value, str):
        return value
    kind = "null" if value is None else type(value).__name__
    raise BadText(f"column '{column}' is {kind}, not text", f"non-string text in '{column}'")


def _format_template(template: str, values: dict) -> str:
    for name, value in values.items():
        if value is None or isinstance(value, (list, dict)):
            kind = "null" if value is None else type(value).__name__
            raise BadText(f"column '{name}' is {kind}, not text", f"non-string text in '{name}'")
    return template.format(**values)


def render_messages(messages, tokenizer=None) -> str:
    """Render a chat `messages` list: the tokenizer's chat template if it has one, else role lines."""
    if not isinstance(messages, list) or not messages:
        raise BadText("'messages' is not a non-empty list of {role, content}", "malformed messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or not isinstance(message.get("role"), str):
            raise BadText("a message lacks a string 'role' or 'content'", "malformed messages")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
