"""JSON schemas as regular expressions, for guided JSON output (``guided_json``, ``response_format``
``json_schema``): ``schema_regex(schema)`` is a pattern (``serve.pattern``'s syntax) whose every
match is a JSON text that the schema accepts, written as ``json.dumps`` writes it (``", "``
between items, ``": "`` after keys, no other white space), with an object's properties in the
schema's order.

What it covers: ``type`` (one or a list), ``enum``, ``const``, ``anyOf`` / ``oneOf`` (as
alternatives), local ``$ref`` (``#/$defs/...``, ``#/definitions/...``; not recursive), objects
with ``properties`` and ``required`` (a property not required may be left out), arrays with
``items``, ``minItems`` and ``maxItems``, strings with ``minLength`` and ``maxLength``, integers
with ``minimum``, ``maximum``, ``exclusiveMinimum`` and ``exclusiveMaximum``, numbers (without
bounds), booleans and null. Keywords that only describe (``title``, ``description``, ``default``,
``examples``...) are ignored, and so is ``additionalProperties`` (the output holds the listed
properties only, which every value of it allows). Any other keyword (``minimum``, ``pattern``,
``format``, ``allOf``...) is refused with a ``ValueError`` naming it and where it is, since
ignoring it could give JSON the schema does not accept; so is an object without ``properties``
(a free-form object needs more than a regular expression).
"""

from __future__ import annotations

import json
import math
import re

DESCRIPTIVE = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "additionalProperties", "$defs", "definitions", "strict"}
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
KEYWORDS = {"type", "enum", "const", "anyOf", "oneOf", "$ref", "properties", "required", "items", "minItems",
            "maxItems", "minLength", "maxLength", *BOUNDS}
MAX_REF_DEPTH = 16

# a character of a JSON string (anything but a quote, a backslash or a control character, or an escape)
STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
SCALARS = {"integer": INTEGER, "number": INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?",
           "boolean": "(?:true|false)", "null": "null"}


def schema_regex(schema) -> str:
    """A pattern for ``schema`` (a dict, or its JSON text); ``ValueError`` naming the part of the
    schema it cannot express."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise ValueError(f"is not valid JSON: {err}") from None
    if not isinstance(schema, dict):
        raise ValueError("must be a JSON schema (an object)")  # noqa: TRY004 - a bad request, as every error here
    return _Converter(schema).regex(schema, "schema", 0)


def _literal(value) -> str:
    return re.escape(json.dumps(value))


def _repeat(unit: str, lo: int, hi: int | None) -> str:
    return f"(?:{unit}){{{lo},{'' if hi is None else hi}}}"


def _digits_between(low: str, high: str) -> str:
    """A pattern for the digit strings of one length from ``low`` to ``high`` (as numbers)."""
    n = len(low)
    if low == high:
        return low
    if n == 1:
        return f"[{low}-{high}]"
    if low[0] == high[0]:
        return low[0] + _digits_between(low[1:], high[1:])
    parts, first, last = [], int(low[0]), int(high[0])
    if low[1:] != "0" * (n - 1):  # low's first digit, the rest from low's rest up
        parts.append(low[0] + _digits_between(low[1:], "9" * (n - 1)))
        first += 1
    tail = None
    if high[1:] != "9" * (n - 1):  # high's first digit, the rest up to high's rest
        tail = high[0] + _digits_between("0" * (n - 1), high[1:])
        last -= 1
    if first <= last:
        parts.append(f"[{first}-{last}][0-9]{{{n - 1}}}")
    if tail:
        parts.append(tail)
    return "(?:" + "|".join(parts) + ")"


def _naturals(low: int, high: int | None) -> list[str]:
    """Patterns for the integers from ``low >= 0`` to ``high`` (None: no end), as JSON writes them."""
    parts, length = [], len(str(low))
    while high is None or length <= len(str(high)):
        start = max(low, 10 ** (length - 1) if length > 1 else 0)
        if high is None and start == 10 ** (length - 1) and length > 1:  # every longer number too
            parts.append(f"[1-9][0-9]{{{length - 1},}}")
            break
        end = 10 ** length - 1 if high is None else min(high, 10 ** length - 1)
        if start <= end:
            parts.append(_digits_between(str(start), str(end)))
        length += 1
    return parts


def integer_range(low: int | None, high: int | None) -> str:
    """A pattern for the integers from ``low`` to ``high`` (inclusive; None: no bound), as JSON
    writes them (no leading zeros, no "-0")."""
    parts = []
    if low is None or low < 0:  # the negative ones: "-" and a natural in [max(1, -high), -low]
        top = None if low is None else -low
        bottom = 1 if high is None or high >= 0 else -high
        parts += ["-" + p for p in _naturals(bottom, top)]
    if high is None or high >= 0:
        parts += _naturals(max(low or 0, 0), high)
    return "(?:" + "|".join(f"(?:{p})" for p in parts) + ")"


class _Converter:
    def __init__(self, root: dict):
        self.root = root

    def regex(self, schema, where: str, depth: int) -> str:
        if schema is True or schema == {}:
            raise ValueError(f"{where}: a schema that allows any JSON value cannot be guided (give its type)")
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: must be a schema (an object), got {json.dumps(schema)}")  # noqa: TRY004
        unknown = sorted(set(schema) - KEYWORDS - DESCRIPTIVE)
        if unknown:
            raise ValueError(f"{where}: {', '.join(map(repr, unknown))} not supported (the output could break it)")
        if any(b in schema for b in BOUNDS) and ("type" not in schema or set(schema) & {"$ref", "const", "enum", "anyOf", "oneOf"}):
            raise ValueError(f"{where}: bounds are supported on an integer type only")
        if "$ref" in schema:
            return self.ref(schema, where, depth)
        if "const" in schema:
            return _literal(schema["const"])
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise ValueError(f"{where}.enum: must be a non-empty list")
            return "(?:" + "|".join(_literal(v) for v in schema["enum"]) + ")"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise ValueError(f"{where}.{key}: must be a non-empty list of schemas")
                return "(?:" + "|".join(self.regex(o, f"{where}.{key}[{i}]", depth) for i, o in enumerate(options)) + ")"
        kind = schema.get("type")
        if kind is None:
            raise ValueError(f"{where}: needs a type (or enum, const, anyOf, $ref)")
        kinds = kind if isinstance(kind, list) else [kind]
        return "(?:" + "|".join(self.typed(schema, k, where, depth) for k in kinds) + ")"

    def ref(self, schema, where: str, depth: int) -> str:
        ref = schema["$ref"]
        if depth >= MAX_REF_DEPTH:
            raise ValueError(f"{where}.$ref: {ref!r} refers back to itself (recursive schemas need more than "
                             "a regular expression)")
        parts = ref.split("/") if isinstance(ref, str) else []
        if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
            raise ValueError(f"{where}.$ref: only '#/$defs/NAME' or '#/definitions/NAME' is supported, got {ref!r}")
        target = self.root.get(parts[1], {}).get(parts[2])
        if target is None:
            raise ValueError(f"{where}.$ref: {ref!r} is not in the schema")
        return self.regex(target, ref, depth + 1)

    def typed(self, schema: dict, kind, where: str, depth: int) -> str:
        if kind == "integer" and any(b in schema for b in BOUNDS):
            return self.integers(schema, where)
        if kind == "number" and any(b in schema for b in BOUNDS):
            raise ValueError(f"{where}: bounds on a number are not supported (on an integer they are)")
        if kind in SCALARS:
            return SCALARS[kind]
        if kind == "string":
            lo, hi = self.bounds(schema, "minLength", "maxLength", where)
            return '"' + (f"{STRING_CHAR}*" if (lo, hi) == (0, None) else _repeat(STRING_CHAR, lo, hi)) + '"'
        if kind == "array":
            if "items" not in schema:
                raise ValueError(f"{where}: an array needs its items' schema")
            item = self.regex(schema["items"], f"{where}.items", depth)
            lo, hi = self.bounds(schema, "minItems", "maxItems", where)
            if hi == 0:
                return r"\[\]"
            rest = _repeat(", " + item, max(lo - 1, 0), None if hi is None else hi - 1)
            items = f"{item}{rest}"
            return rf"\[(?:{items})?\]" if lo == 0 else rf"\[{items}\]"
        if kind == "object":
            return self.object(schema, where, depth)
        raise ValueError(f"{where}.type: {json.dumps(kind)} is not a JSON schema type")

    @staticmethod
    def integers(schema: dict, where: str) -> str:
        low = high = None
        for name in BOUNDS:
            if name not in schema:
                continue
            value = schema[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}.{name}: must be a number, got {json.dumps(value)}")  # noqa: TRY004
            exclusive = name.startswith("exclusive")
            if name.endswith("inimum"):
                bound = math.floor(value) + 1 if exclusive else math.ceil(value)
                low = bound if low is None else max(low, bound)
            else:
                bound = math.ceil(value) - 1 if exclusive else math.floor(value)
                high = bound if high is None else min(high, bound)
        if low is not None and high is not None and high < low:
            raise ValueError(f"{where}: no integer lies within its bounds")
        return integer_range(low, high)

    @staticmethod
    def bounds(schema: dict, low: str, high: str, where: str) -> tuple[int, int | None]:
        lo, hi = schema.get(low, 0), schema.get(high)
        for name, value in ((low, lo), (high, hi)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1000):
                raise ValueError(f"{where}.{name}: must be an integer in [0, 1000], got {json.dumps(value)}")
        if hi is not None and hi < lo:
            raise ValueError(f"{where}: {high} {hi} is below {low} {lo}")
        return lo, hi

    def object(self, schema: dict, where: str, depth: int) -> str:
        properties = schema.get("properties")
        if not isinstance(properties, dict) or not properties:
            raise ValueError(f"{where}: an object needs its properties listed (a free-form object needs more "
                             "than a regular expression)")
        required = schema.get("required", [])
        if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
            raise ValueError(f"{where}.required: must be a list of property names")
        missing = sorted(set(required) - set(properties))
        if missing:
            raise ValueError(f"{where}.required: {', '.join(map(repr, missing))} not among the properties")
        items = [(_literal(name) + ": " + self.regex(sub, f"{where}.properties.{name}", depth), name in required)
                 for name, sub in properties.items()]
        # each way to begin: the first property present is i (every one before it optional), then
        # every later one after ", ", optional where it is not required
        ways = []
        for i, (first, _) in enumerate(items):
            ways.append(first + "".join(f"(?:, {p})" + ("" if needed else "?") for p, needed in items[i + 1:]))
            if items[i][1]:
                break
        body = "|".join(f"(?:{w})" for w in ways)
        return rf"\{{(?:{body})\}}" if any(needed for _, needed in items) else rf"\{{(?:{body})?\}}"
