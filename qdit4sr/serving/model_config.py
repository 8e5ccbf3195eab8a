"""Triton model configurations (`config.pbtxt`): written from Python values, read back strictly.

A configuration is built as nested Python values (dict = message, list of dicts = repeated message,
list of scalars = repeated scalar, `Enum("TYPE_FP32")` = enum value) and written by `render` in the
protobuf text format of Triton's `ModelConfig` message. `check_model_config` reads a text back:
with tritonclient's `model_config_pb2` when it is installed (every field and enum name is checked
against Triton's schema), otherwise with `parse_text_format`, a strict parser of the text format
that checks the syntax only.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# manifest dtype -> Triton data type
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


class ModelConfigError(ValueError):
    """A config.pbtxt that does not parse (or names fields Triton does not have)."""


@dataclass(frozen=True)
class Enum:
    """An enum value, written without quotes (KIND_CPU, TYPE_FP32)."""

    name: str


def parameters(values: dict[str, str]) -> list[dict]:
    """Triton's `parameters` map (string values) as repeated key/value entries."""
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


# ----------------------------------------------------------------------------- writing

def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)   # ASCII names and paths: JSON's escapes are valid text-format escapes
    raise TypeError(f"cannot write {type(value).__name__} into a model config")


def render(message: dict[str, Any], indent: int = 0) -> str:
    """The text format of `message`, two spaces per level, fields in the dict's order."""
    pad = "  " * indent
    lines: list[str] = []
    for key, value in message.items():
        if isinstance(value, dict):
            body = render(value, indent + 1)
            lines += [f"{pad}{key} {{", *([body] if body else []), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{pad}{key} [")
            for i, item in enumerate(value):
                body = render(item, indent + 2)
                lines += [f"{pad}  {{", *([body] if body else []), f"{pad}  }}" + ("," if i < len(value) - 1 else "")]
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reading

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\\n]|\\.)*"|[A-Za-z_][A-Za-z0-9_]*|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?'
                    r'|[{}\[\]:,;]')


def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ModelConfigError(f"unexpected character {text[pos]!r} at offset {pos}")
        if not (m.group().isspace() or m.group().startswith("#")):
            tokens.append(m.group())
        pos = m.end()
    return tokens


def parse_text_format(text: str) -> dict[str, list]:
    """Strict parse of protobuf text format into {field: [values]} (a message value is such a dict).

    Only the syntax is checked: field names and enum values are not known without the schema.
    """
    tokens = _tokens(text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take(expected: str | None = None) -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ModelConfigError(f"text ends early (expected {expected or 'a value'})")
        token = tokens[pos]
        if expected is not None and token != expected:
            raise ModelConfigError(f"expected {expected!r}, found {token!r} (token {pos})")
        pos += 1
        return token

    def scalar() -> Any:
        token = take()
        if token.startswith('"'):
            return json.loads(token)
        if re.fullmatch(r"[-+]?\d+", token):
            return int(token)
        if re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", token):
            return float(token)
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token):
            return Enum(token) if token not in ("true", "false") else token == "true"
        raise ModelConfigError(f"expected a value, found {token!r}")

    def message(closing: str | None) -> dict[str, list]:
        fields: dict[str, list] = {}
        while peek() != closing:
            name = take()
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ModelConfigError(f"expected a field name, found {name!r}")
            has_colon = peek() == ":"
            if has_colon:
                take(":")
            values = fields.setdefault(name, [])
            if peek() == "[":
                take("[")
                while peek() != "]":
                    values.append(message_value() if peek() == "{" else scalar())
                    if peek() == ",":
                        take(",")
                    elif peek() != "]":
                        raise ModelConfigError(f"expected ',' or ']' in the list of {name!r}, found {peek()!r}")
                take("]")
            elif peek() == "{":
                values.append(message_value())
            elif has_colon:
                values.append(scalar())
            else:
                raise ModelConfigError(f"field {name!r} has no value")
            if peek() in (",", ";"):
                take()
        return fields

    def message_value() -> dict[str, list]:
        take("{")
        body = message("}")
        take("}")
        return body

    result = message(None)
    if pos != len(tokens):
        raise ModelConfigError(f"unexpected {tokens[pos]!r} after the message")
    return result


def model_config_schema():
    """tritonclient's ModelConfig message class, or None when tritonclient is not installed."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    return model_config_pb2.ModelConfig


def check_model_config(text: str):
    """Parse a config.pbtxt: the ModelConfig message (schema checked) or, without tritonclient, the
    syntax tree of `parse_text_format`. Raises ModelConfigError naming the problem."""
    schema = model_config_schema()
    if schema is None:
        return parse_text_format(text)
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, schema())
    except text_format.ParseError as e:
        raise ModelConfigError(str(e)) from e
