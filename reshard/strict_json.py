"""A JSON reader no more permissive than the safetensors reference (Rust serde_json).

Python's json accepts what serde_json refuses: NaN / Infinity, numbers that overflow a double
(1e999, 400-digit integers), lone surrogate escapes (\\ud800), and any nesting depth (until a
RecursionError). `load_json` refuses all of these, and duplicate keys, with an error naming
the file and the key path. It reads bytes: non-UTF-8 input is refused too.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# serde_json's recursion limit: 127 nested containers parse, the 128th is refused.
MAX_DEPTH = 127
# serde_json reads an integer that does not fit 64 bits as a double; past ~309 digits the
# double overflows and it refuses the number. Longer literals are refused before int().
MAX_INT_DIGITS = 310
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: fast on long text
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # only escapes can make one in UTF-8 text


class _Invalid:
    """A value the hooks refused; reported with its key path once parsing is done."""

    def __init__(self, why: str):
        self.why = why


def load_json(raw: bytes, path: Path | str, *, what: str, fix: str) -> Any:
    """Parse `raw` strictly. `what` names the document ("the header"), `fix` ends messages."""
    text = _decode(raw, path, what, fix)
    _check_depth(text, path, what, fix)
    refused: list[_Invalid] = []

    def keep(value):  # note refused values: the walk that names their key runs only then
        if isinstance(value, _Invalid):
            refused.append(value)
        return value

    try:
        doc = json.loads(
            text,
            parse_constant=lambda s: keep(_Invalid(f"{s} is not JSON")),
            parse_float=lambda s: keep(_parse_float(s)),
            parse_int=lambda s: keep(_parse_int(s)),
            object_pairs_hook=_reject_duplicates,
        )
    except _DuplicateKey as e:
        raise CheckpointError(
            f"{path}: {what}: key {e.key!r} appears twice in one object, so which value is "
            f"meant is ambiguous. {fix}"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: {what} is not valid JSON ({e}){_near(text, e.pos)}. {fix}"
        ) from None
    if refused or _SURROGATE_ESCAPE.search(text):
        _check_values(doc, (), path, what, fix)
    return doc


def read_json(path: Path, *, what: str, fix: str) -> Any:
    """Read and parse a JSON file; OS errors are the caller's (they are exit 3, not 2)."""
    return load_json(Path(path).read_bytes(), path, what=what, fix=fix)


def _decode(raw: bytes, path, what: str, fix: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        prefix = raw[: e.start].decode("utf-8", "replace")
        raise CheckpointError(
            f"{path}: {what} is not valid UTF-8 (byte {raw[e.start]:#04x} at offset "
            f"{e.start}){_near(prefix, len(prefix))}. {fix}"
        ) from None


def _check_depth(text: str, path, what: str, fix: str) -> None:
    """Refuse nesting past MAX_DEPTH before json recurses into it. Strings are cut out
    first, so the loop runs over brackets only."""
    depth = 0
    for ch in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        depth += 1 if ch in "[{" else -1
        if depth > MAX_DEPTH:
            raise CheckpointError(
                f"{path}: {what} nests deeper than {MAX_DEPTH} levels{_near(text, _deep(text))}"
                f"; the safetensors reference refuses that too. {fix}"
            )


def _deep(text: str) -> int:
    """The character offset where nesting first passes MAX_DEPTH."""
    depth = 0
    for m in _TOKEN.finditer(text):
        if m.group() in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return m.start()
        elif m.group() in "]}":
            depth -= 1
    return len(text)


def _near(text: str, pos: int) -> str:
    """', near key 'a.b'': the object keys open at character `pos`, for a positional error."""
    keys: list[str | None] = []
    for m in _TOKEN.finditer(text, 0, pos):
        token = m.group()
        if token in "[{":
            keys.append(None)
        elif token in "]}":
            keys = keys[:-1]
        elif keys and text[m.end() : m.end() + 10].lstrip().startswith(":"):
            keys[-1] = token[1:-1]  # a key: the string before a colon
    named = [k for k in keys if k is not None]
    return f", near key {_key_path(tuple(named))}" if named else ""


def _parse_float(s: str):
    value = float(s)
    return value if math.isfinite(value) else _Invalid(f"the number {s[:20]} overflows a double")


def _parse_int(s: str):
    if len(s) <= 18:  # fits 60 bits: the common case, no checks needed
        return -0.0 if s == "-0" else int(s)  # serde_json reads -0 as a double
    digits = len(s.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        return _Invalid(f"an integer of {digits} digits overflows a double")
    value = int(s)
    try:
        float(value)
    except OverflowError:
        return _Invalid(f"an integer of {digits} digits overflows a double")
    return value


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _reject_duplicates(pairs):
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return doc


def _check_values(value, keys: tuple, path, what: str, fix: str) -> None:
    """Walk the parsed document: refused numbers and lone surrogates, named by key path."""
    if isinstance(value, _Invalid):
        raise CheckpointError(f"{path}: {what}, key {_key_path(keys)}: {value.why}. {fix}")
    if isinstance(value, str):
        _check_surrogates(value, keys, path, what, fix)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_surrogates(k, (*keys, k), path, what, fix)
            _check_values(v, (*keys, k), path, what, fix)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_values(v, (*keys, i), path, what, fix)


def _check_surrogates(text: str, keys: tuple, path, what: str, fix: str) -> None:
    if _SURROGATE.search(text):
        raise CheckpointError(
            f"{path}: {what}, key {_key_path(keys)}: the string {text[:40]!r} holds a lone "
            f"surrogate escape (\\ud800-\\udfff), which is not valid Unicode. {fix}"
        )


def _key_path(keys: tuple) -> str:
    if not keys:
        return "(top level)"
    text = repr(".".join(str(k) for k in keys))  # repr: a key with a newline stays one line
    return text if len(text) <= 120 else text[:117] + "..."
