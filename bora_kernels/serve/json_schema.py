"""JSON schemas as regular expressions, for guided JSON output (``guided_json``, ``response_format``
``json_schema``): ``schema_regex(schema)`` is a pattern (``serve.pattern``'s syntax) whose every
match is a JSON text that the schema accepts, written as ``json.dumps`` writes it (``", "``
between items, ``": "`` after keys, no other white space), with an object's properties in the
schema's order.

What it covers (what Pydantic's ``model_json_schema()`` writes for the usual field types):

- ``type`` (one or a list), ``enum``, ``const``, local ``$ref`` (``#/$defs/...``,
  ``#/definitions/...``; a recursive schema, such as a tree, is written out ``MAX_RECURSION``
  levels deep and ends there where its next level is optional, else it is refused), ``allOf``
  of one schema;
- ``anyOf`` as alternatives, leaving out those it cannot express while one is left (so Pydantic's
  ``Decimal``, a number or a string with a look-ahead pattern, is written as a number);
  ``oneOf`` the same when no two of its alternatives can match one text (else refused: the output
  could match two);
- objects with ``properties`` and ``required`` (a property not required may be left out; the
  output holds the listed properties only, which every ``additionalProperties`` allows), or
  without ``properties`` but with ``additionalProperties`` a schema (a map from any string to its
  values; ``maxProperties``, and ``minProperties`` up to 1, as a key may be written twice);
- arrays with ``items`` and/or ``prefixItems``, ``minItems``, ``maxItems``; ``uniqueItems`` on
  items of a few listed values (``enum``, ``const``, ``boolean``: Pydantic's ``set[Literal[...]]``
  or ``set[SomeEnum]``), each written at most once and in the listed order;
- free-form values: a schema with no keywords but descriptive ones (``{}``, Pydantic's ``Any``)
  is any JSON value, an object with no ``properties`` (and ``additionalProperties`` true or
  absent: Pydantic's ``dict[str, Any]``, OpenAI's ``json_object``) any object, an array with no
  ``items`` any array; their arrays and objects nest at most ``FREE_DEPTH`` deep, themselves
  included (a regular expression cannot follow nesting without end; ``free_value``);
- strings with ``minLength``/``maxLength``, or a ``pattern`` (a search within the value, as the
  schema means it; see ``pattern.json_string_pattern``), or a ``format``: ``date``, ``time``,
  ``date-time`` (RFC 3339), ``uuid``, ``ipv4``, ``email``, ``uri`` (each a strict subset of what
  validators accept, for example ``http(s)`` URIs only);
- integers and numbers with ``minimum``, ``maximum``, ``exclusiveMinimum`` and
  ``exclusiveMaximum`` (a bounded ``number`` is written as a plain decimal, without an exponent;
  a bound is read as the decimal its double is written as, 0.1 as 0.1, and is kept to as
  validators that read numbers as doubles check it), booleans and null.

Keywords that only describe (``title``, ``description``, ``default``, ``examples``,
``discriminator``...) are ignored. Any other keyword (``not``, ``if``...) is refused with a
``ValueError`` naming it and where it is, since ignoring it could give JSON the schema does not
accept. ``multipleOf`` is refused too:
validators disagree on it for fractions (Python's ``jsonschema`` divides doubles and finds that
0.29 is not a multiple of 0.01; Pydantic allows for rounding), so no output would pass them all.
"""

from __future__ import annotations

import fractions
import functools
import json
import math
import re

from .pattern import SCHEMA_LIMITS, Pattern, json_string_pattern

DESCRIPTIVE = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "$defs", "definitions", "strict", "discriminator"}
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
KEYWORDS = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "properties", "required",
            "additionalProperties", "minProperties", "maxProperties", "items", "prefixItems", "minItems", "maxItems",
            "uniqueItems", "minLength", "maxLength", "pattern", "format", *BOUNDS}
COMBINERS = ("allOf", "$ref", "const", "enum", "anyOf", "oneOf")  # each stands alone (a type beside const, enum)
MAX_REF_DEPTH = 16  # $refs within $refs
MAX_RECURSION = 3  # levels of a recursive schema written out (where the next is optional, it stops there)
MAX_LEADING_OPTIONAL = 150  # optional properties before an object's first required one (each nests a group)
FREE_DEPTH = 3  # arrays and objects a free-form value nests, itself included: {"a": [{"b": 1}]} is 3
JSON_OBJECT_DEPTH = 4  # the same for a whole output of any object (OpenAI's json_object)

# a character of a JSON string (anything but a quote, a backslash or a control character, or an escape)
STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
INTEGER = r"(?:0|-?[1-9][0-9]*)"  # as json.dumps writes integers: no "-0"
# numbers: at most 16 digits before the point and a two-digit exponent, so that every one is a
# finite double (a reader such as Pydantic's refuses "1e400", which is inf)
NUMBER_DIGITS = 16
SCALARS = {"integer": INTEGER,
           "number": rf"-?(?:0|[1-9][0-9]{{0,{NUMBER_DIGITS - 1}}})(?:\.[0-9]+)?(?:[eE][+-]?[0-9]{{1,2}})?",
           "boolean": "(?:true|false)", "null": "null"}
FRACTION = r"(?:\.[0-9]+)?"

# string formats: strict subsets of what validators accept (Python's date/time parsing, RFC 3339,
# RFC 4122 in lower case, dotted quads, plain addresses and http(s) URIs), with their lengths
_YEAR = r"(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_MONTH_DAY = r"(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)"
_LEAP_DAY = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)-02-29"
_DATE = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_DAY})"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_URI_CHARS = r"[A-Za-z0-9._~!$&'()*+,;=:@/-]"
FORMATS = {  # name: (pattern, shortest, longest or None)
    "date": (_DATE, 10, 10),
    "time": (_TIME, 9, 21),
    "date-time": (rf"{_DATE}T{_TIME}", 20, 32),
    "uuid": (r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", 36, 36),
    "ipv4": (rf"{_OCTET}(?:\.{_OCTET}){{3}}", 7, 15),
    "email": (rf"[A-Za-z0-9_+-]{{1,32}}(?:\.[A-Za-z0-9_+-]{{1,32}}){{0,3}}@(?:{_LABEL}\.){{1,3}}[A-Za-z]{{2,12}}",
              6, 32 + 3 * 33 + 1 + 3 * 64 + 12),
    "uri": ((rf"https?://(?:{_LABEL}\.){{0,3}}{_LABEL}(?::[1-9][0-9]{{0,3}})?(?:/{_URI_CHARS}{{0,64}})?"
             rf"(?:\?(?:{_URI_CHARS}|\?){{0,64}})?(?:#(?:{_URI_CHARS}|\?){{0,32}})?"),
            8, 8 + 3 * 64 + 63 + 5 + 65 + 65 + 33),
}


class Unsupported(ValueError):
    """A part of a schema it cannot express (rather than one that is malformed): ``anyOf`` leaves
    such alternatives out."""


class TooDeep(Unsupported):
    """A recursive schema's level past ``MAX_RECURSION``: where it is optional (an ``anyOf``
    alternative, a property not required, the items of an array that may be empty) it is left out."""


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
    return _Converter(schema).regex(schema, "schema", ())


@functools.cache
def free_value(depth: int = FREE_DEPTH, kind: str | None = None) -> str:
    """A pattern for any JSON value (``kind`` "array" or "object": any of that kind) whose
    arrays and objects nest at most ``depth`` deep, itself included (0: a string, number, boolean
    or null). Each level holds the one below it twice (its first item and the others), so the
    pattern grows about four times a level."""
    if kind is None:
        scalars = [f'"{STRING_CHAR}*"', *SCALARS.values()]
        return "(?:" + "|".join(scalars + ([free_value(depth, "array"), free_value(depth, "object")] if depth else [])) + ")"
    inner = free_value(depth - 1)
    if kind == "array":
        return rf"\[(?:{inner}(?:, {inner})*)?\]"
    pair = f'"{STRING_CHAR}*": {inner}'
    return rf"\{{(?:{pair}(?:, {pair})*)?\}}"


def json_object_regex() -> str:
    """A pattern for any JSON object whose arrays and objects nest at most ``JSON_OBJECT_DEPTH``
    deep, itself included (OpenAI's ``response_format: {"type": "json_object"}``)."""
    return free_value(JSON_OBJECT_DEPTH, "object")


def _in_order(parts: list[tuple[str, bool]], where: str) -> str:
    """A pattern for ``parts`` (each a pattern, and whether it is required) written in order,
    joined by ", ", the optional ones left out or not; some part is always written. Built part by
    part: what can be written up to part j is what could be written up to part j - 1, then part
    j after ", " (or not, if optional), or, while every part before it is optional, part j alone.
    So each part is written at most twice, and the pattern grows linearly with the parts; each
    optional part before the first required one nests a group deeper (``Unsupported`` past
    ``MAX_LEADING_OPTIONAL``)."""
    written, empty_before = "", True  # (written: a pattern for the texts so far that are not empty)
    for i, (part, needed) in enumerate(parts):
        if empty_before and i >= MAX_LEADING_OPTIONAL:
            raise Unsupported(f"{where}: over {MAX_LEADING_OPTIONAL} optional properties or values before the first "
                              "required one are not supported")
        if written:
            written += f", {part}" if needed else f"(?:, {part})?"
        if empty_before:
            written = f"(?:{written}|{part})" if written else f"(?:{part})"
        empty_before = empty_before and not needed
    return written


def _json_types(value) -> set[str]:
    """The JSON schema types a value is of."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, (int, float)):
        return {"number", "integer"} if float(value).is_integer() else {"number"}
    return {"string" if isinstance(value, str) else "array" if isinstance(value, list) else "object"}


def _literal(value) -> str:
    return re.escape(json.dumps(value))


def _repeat(unit: str, lo: int, hi: int | None) -> str:
    return f"(?:{unit}){{{lo},{'' if hi is None else hi}}}"


def _digits_between(low: str, high: str, point: int | None = None) -> str:
    """A pattern for the digit strings of one length from ``low`` to ``high`` (as numbers), with
    a decimal point before the digit at index ``point`` (None: no point)."""
    n = len(low)
    if point == 0:
        return r"\." + _digits_between(low, high)
    if low == high:
        return low if point is None else rf"{low[:point]}\.{low[point:]}"
    if n == 1:
        return f"[{low}-{high}]"
    inner = None if point is None else point - 1  # the point's index in the digits after the first
    if low[0] == high[0]:
        return low[0] + _digits_between(low[1:], high[1:], inner)
    parts, first, last = [], int(low[0]), int(high[0])
    if low[1:] != "0" * (n - 1):  # low's first digit, the rest from low's rest up
        parts.append(low[0] + _digits_between(low[1:], "9" * (n - 1), inner))
        first += 1
    tail = None
    if high[1:] != "9" * (n - 1):  # high's first digit, the rest up to high's rest
        tail = high[0] + _digits_between("0" * (n - 1), high[1:], inner)
        last -= 1
    if first <= last:
        parts.append(f"[{first}-{last}]" + _any_digits(n - 1, inner))
    if tail:
        parts.append(tail)
    return "(?:" + "|".join(parts) + ")"


def _any_digits(n: int, point: int | None) -> str:
    """``n`` digits, with a point before the one at index ``point`` (None: no point)."""
    if point is not None:
        return _any_digits(point, None) + r"\." + _any_digits(n - point, None)
    return f"[0-9]{{{n}}}" if n else ""


def _naturals(low: int, high: int | None, places: int = 0) -> list[str]:
    """Patterns for the numbers from ``low / 10**places`` to ``high / 10**places`` (``low >= 0``;
    None: no end) in steps of ``10**-places``, as JSON writes them with exactly ``places`` digits
    after the point (none when 0: the integers from ``low`` to ``high``)."""
    parts, length, run = [], max(len(str(low)), places + 1), None  # length: digits in all
    fraction = rf"\.[0-9]{{{places}}}" if places else ""

    def whole_run(first: int, last: int | None) -> str:  # every number of these whole-part lengths
        return f"[1-9][0-9]{{{first - 1},{'' if last is None else last - 1}}}" + fraction

    while high is None or length <= max(len(str(high)), places + 1):
        whole = length - places  # digits before the point
        start = max(low, 10 ** (length - 1) if whole > 1 else 0)
        end = 10 ** length - 1 if high is None else min(high, 10 ** length - 1)
        if whole > 1 and start == 10 ** (length - 1) and end == 10 ** length - 1:
            if high is None:
                parts.append(whole_run(run or whole, None))
                return parts
            run = run or whole
        else:
            if run:
                parts.append(whole_run(run, whole - 1))
                run = None
            if start <= end:
                parts.append(_digits_between(str(start).zfill(length), str(end).zfill(length), whole if places else None))
        length += 1
    if run:
        parts.append(whole_run(run, length - 1 - places))
    return parts


def _places(value: fractions.Fraction) -> int:
    """The digits after the point that ``value`` (a decimal) needs."""
    twos = fives = 0
    denominator = value.denominator
    while denominator % 2 == 0:
        denominator, twos = denominator // 2, twos + 1
    while denominator % 5 == 0:
        denominator, fives = denominator // 5, fives + 1
    return max(twos, fives)


def _decimals(low: fractions.Fraction, low_in: bool, high: fractions.Fraction | None, high_in: bool) -> list[str]:
    """Patterns for the decimals (no exponent, no sign) from ``low >= 0`` to ``high`` (None: any
    with up to ``NUMBER_DIGITS`` digits before the point), each bound inclusive or not.

    The bounds are scaled to integers ``L``, ``H`` by ``10**F``, ``F`` the digits after the point
    they need. A text with fewer than ``F`` such digits is a whole number of ``10**-k`` steps,
    ``k < F``; one with ``F`` or more begins with some ``X`` steps of ``10**-F``, and is within the
    bounds where ``L < X < H``, or at ``X = L`` or ``X = H`` as the digits after ``X`` decide.
    Beside a bound that is not inclusive those digits keep to the ones a double tells apart from
    it (``_kept_digits``): "2.99999999999999999" reads as 3.0, which ``exclusiveMaximum: 3``
    refuses. ``Unsupported`` for bounds with over ``NUMBER_DIGITS`` digits after the point, or a
    bound not inclusive of ``10**14`` steps or more."""
    if high is not None and (high < low or (high == low and not (low_in and high_in))):
        return []
    places = max(_places(low), 0 if high is None else _places(high))
    if places > NUMBER_DIGITS:
        raise Unsupported(f"bounds with over {NUMBER_DIGITS} digits after the point are not supported")
    low_x = int(low * 10 ** places)
    high_x = 10 ** (NUMBER_DIGITS + places) if high is None else int(high * 10 ** places)
    high_in = high_in and high is not None  # no bound: every X below 10**(NUMBER_DIGITS + F)
    for bound, inclusive in ((low_x, low_in), (high_x, high_in or high is None)):
        if not inclusive and bound >= 10 ** 14:
            raise Unsupported("a bound that is not inclusive must be under 10**14 (a double cannot tell the numbers "
                              "just within it from it), counted in steps of the bounds' last decimal place")
    parts = []
    for k in range(places):  # fewer digits after the point: whole steps of 10**-k
        step = 10 ** (places - k)
        first = -(-low_x // step) if low_in else low_x // step + 1
        last = high_x // step if high_in else -(-high_x // step) - 1
        if first <= last:
            parts += _naturals(first, last, k)

    def after(most: int | None = None, nonzero: bool = False) -> str:  # the digits after X's
        digits = rf"[0-9]{{0,{most - 1}}}[1-9]0*" if nonzero else "[0-9]*" if most is None else rf"[0-9]{{0,{most}}}0*"
        if places:
            return digits
        return rf"\.{digits}" if nonzero else FRACTION if most is None else rf"(?:\.[0-9]{{1,{most}}}0*)?"

    def at(x: int) -> str:
        return _naturals(x, x, places)[0]

    zeros = "0*" if places else r"(?:\.0+)?"
    if low_x == high_x:
        return [*parts, at(low_x) + zeros]
    near_high = None if high_in or high is None else _kept_digits(high_x)  # digits after X = H - 1
    if low_in:
        parts.append(at(low_x) + after(near_high if low_x == high_x - 1 else None))
    else:
        near = [_kept_digits(low_x), *([near_high] if near_high and low_x == high_x - 1 else [])]
        parts.append(at(low_x) + after(min(near), nonzero=True))
    middle_last = high_x - 1 if high_in or high is None else high_x - 2  # any digits after X up to here
    if low_x + 1 <= middle_last:
        parts += [p + after() for p in _naturals(low_x + 1, middle_last, places)]
    if near_high and low_x + 1 <= high_x - 1:
        parts.append(at(high_x - 1) + after(near_high))
    if high_in:
        parts.append(at(high_x) + zeros)
    return parts


def _kept_digits(bound: int) -> int:
    """Digits after those of ``bound``'s steps that a double still tells apart from it (``bound``
    under 10**14; 15 significant digits in all)."""
    return max(1, 15 - len(str(bound)))


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

    def regex(self, schema, where: str, refs: tuple) -> str:
        if schema is True or (isinstance(schema, dict) and not set(schema) - DESCRIPTIVE):
            return free_value()  # any JSON value (Pydantic's Any: a title alone)
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: must be a schema (an object), got {json.dumps(schema)}")  # noqa: TRY004
        unknown = sorted(set(schema) - KEYWORDS - DESCRIPTIVE)
        if unknown:
            raise Unsupported(f"{where}: {', '.join(map(repr, unknown))} not supported (the output could break it)")
        if any(b in schema for b in BOUNDS) and "type" not in schema:
            raise Unsupported(f"{where}: bounds are supported beside an integer or number type only")
        combiner = next((key for key in COMBINERS if key in schema), None)
        if combiner is not None:
            beside = set(schema) - DESCRIPTIVE - {combiner} - ({"type"} if combiner in ("const", "enum") else set())
            if beside:
                raise Unsupported(f"{where}: {', '.join(map(repr, sorted(beside)))} beside {combiner!r} not supported")
        if combiner == "allOf":
            options = schema["allOf"]
            if not isinstance(options, list) or len(options) != 1:
                raise Unsupported(f"{where}.allOf: only one schema is supported (several need their intersection)")
            return self.regex(options[0], f"{where}.allOf[0]", refs)
        if combiner == "$ref":
            return self.ref(schema, where, refs)
        if combiner in ("const", "enum"):
            return "(?:" + "|".join(_literal(v) for v in self.listed(schema, combiner, where)) + ")"
        if combiner in ("anyOf", "oneOf"):
            return self.alternatives(schema[combiner], f"{where}.{combiner}", refs, combiner == "oneOf")
        kind = schema.get("type")
        if kind is None:
            raise ValueError(f"{where}: needs a type (or enum, const, anyOf, $ref)")
        kinds = kind if isinstance(kind, list) else [kind]
        return "(?:" + "|".join(self.typed(schema, k, where, refs) for k in kinds) + ")"

    @staticmethod
    def listed(schema: dict, combiner: str, where: str) -> list:
        """The values of an ``enum`` or ``const`` (of its ``type``, where it has one)."""
        values = [schema["const"]] if combiner == "const" else schema["enum"]
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.enum: must be a non-empty list")
        if "type" in schema:  # the values of that type only
            kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            values = [v for v in values if _json_types(v) & set(kinds)]
            if not values:
                raise ValueError(f"{where}: no value of its {combiner} is of its type")
        return values

    def few_values(self, schema, where: str, refs: tuple) -> list:
        """The values a schema of a few listed values allows (``enum``, ``const``, ``boolean``,
        ``null``, through local ``$ref``s), distinct as JSON tells values apart (1 and 1.0 are
        one, 1 and true two); ``Unsupported`` for any other."""
        while isinstance(schema, dict) and set(schema) - DESCRIPTIVE == {"$ref"}:
            schema, where, refs = self.resolve(schema, where, refs)
        if not isinstance(schema, dict):
            values = None
        elif "enum" in schema or "const" in schema:
            self.regex(schema, where, refs)  # (its checks)
            values = self.listed(schema, "enum" if "enum" in schema else "const", where)
        else:
            values = {"boolean": [True, False], "null": [None]}.get(schema.get("type"))
            if values is not None and set(schema) - DESCRIPTIVE - {"type"}:
                values = None
        if values is None:
            raise Unsupported(f"{where}: uniqueItems is supported on items of a few listed values only (enum, "
                              "const, boolean)")
        distinct = {}
        for v in values:
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            distinct.setdefault(("number", float(v)) if number else json.dumps(v, sort_keys=True), v)
        return list(distinct.values())

    def alternatives(self, options, where: str, refs: tuple, only_one: bool) -> str:
        """anyOf / oneOf: the alternatives it can express (an error only when none is left); for
        oneOf they must not overlap, since a text that two of them match is refused."""
        if not isinstance(options, list) or not options:
            raise ValueError(f"{where}: must be a non-empty list of schemas")
        kept, errors = [], []
        for i, option in enumerate(options):
            try:
                kept.append((i, self.regex(option, f"{where}[{i}]", refs)))
            except Unsupported as err:
                errors.append(err)
        if not kept:
            raise errors[0]
        if only_one and len(kept) > 1:
            patterns = [(i, Pattern(regex, SCHEMA_LIMITS)) for i, regex in kept]
            for n, (i, first) in enumerate(patterns):
                for j, second in patterns[n + 1:]:
                    try:
                        overlap = first.intersects(second)
                    except ValueError as err:
                        raise Unsupported(f"{where}: [{i}] and [{j}] are {err}") from None
                    if overlap:
                        raise Unsupported(f"{where}: [{i}] and [{j}] can match the same text, which oneOf refuses")
        return "(?:" + "|".join(regex for _, regex in kept) + ")"

    def ref(self, schema, where: str, refs: tuple) -> str:
        return self.regex(*self.resolve(schema, where, refs))

    def resolve(self, schema: dict, where: str, refs: tuple) -> tuple[dict, str, tuple]:
        """The schema a ``$ref`` names, where it is, and the ``$ref``s followed to it."""
        ref = schema["$ref"]
        if refs.count(ref) >= MAX_RECURSION:
            raise TooDeep(f"{where}.$ref: {ref!r} refers back to itself at every level (a recursive schema is "
                          f"written out {MAX_RECURSION} levels deep, where the next level is optional)")
        if len(refs) >= MAX_REF_DEPTH:
            raise Unsupported(f"{where}.$ref: $refs nest more than {MAX_REF_DEPTH} deep")
        parts = ref.split("/") if isinstance(ref, str) else []
        if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
            raise Unsupported(f"{where}.$ref: only '#/$defs/NAME' or '#/definitions/NAME' is supported, got {ref!r}")
        target = self.root.get(parts[1], {}).get(parts[2])
        if target is None:
            raise ValueError(f"{where}.$ref: {ref!r} is not in the schema")
        return target, ref, refs + (ref,)

    def typed(self, schema: dict, kind, where: str, refs: tuple) -> str:
        if kind in ("integer", "number") and any(b in schema for b in BOUNDS):
            return self.numbers(schema, kind, where)
        if kind in SCALARS:
            return SCALARS[kind]
        if kind == "string":
            return self.string(schema, where)
        if kind == "array":
            return self.array(schema, where, refs)
        if kind == "object":
            return self.object(schema, where, refs)
        raise ValueError(f"{where}.type: {json.dumps(kind)} is not a JSON schema type")

    @staticmethod
    def numbers(schema: dict, kind: str, where: str) -> str:
        """Integers from the bounds' integers within; numbers as plain decimals (each bound read
        as the decimal its double is written as: 0.1 as 0.1)."""
        low = high = None  # (bound, inclusive)
        for name in BOUNDS:
            if name not in schema:
                continue
            value = schema[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}.{name}: must be a number, got {json.dumps(value)}")
            inclusive = not name.startswith("exclusive")
            if kind == "integer":  # the integers within, inclusive
                value = (math.ceil(value) if inclusive else math.floor(value) + 1) if name.endswith("inimum") \
                    else (math.floor(value) if inclusive else math.ceil(value) - 1)
                inclusive = True
            bound = (value if kind == "integer" else fractions.Fraction(repr(value) if isinstance(value, float) else value),
                     inclusive)
            if name.endswith("inimum"):  # the tighter of minimum and exclusiveMinimum
                low = bound if low is None or (bound[0], not bound[1]) > (low[0], not low[1]) else low
            else:
                high = bound if high is None or (bound[0], bound[1]) < (high[0], high[1]) else high
        if kind == "integer":
            if low is not None and high is not None and high[0] < low[0]:
                raise ValueError(f"{where}: no integer lies within its bounds")
            return integer_range(low and low[0], high and high[0])
        # beyond NUMBER_DIGITS digits before the point is as good as no bound (see SCALARS)
        largest = 10 ** NUMBER_DIGITS
        if (low and low[0] >= largest) or (high and high[0] <= -largest):
            raise Unsupported(f"{where}: bounds that leave only numbers of over {NUMBER_DIGITS} digits are not supported")
        low = None if low is None or low[0] <= -largest else low
        high = None if high is None or high[0] >= largest else high
        parts = []
        try:
            if high is None or high[0] > 0 or high == (0, True):  # 0 and up: "0", "0.5", "12.0"...
                parts += _decimals(*((0, True) if low is None or low[0] < 0 else low), *(high or (None, False)))
            if low is None or low[0] < 0:  # below 0: "-" and a magnitude over 0
                parts += ["-" + p for p in _decimals(*((0, False) if high is None or high[0] >= 0 else (-high[0], high[1])),
                                                     *((None, False) if low is None else (-low[0], low[1])))]
        except Unsupported as err:
            raise Unsupported(f"{where}: {err}") from None
        if not parts:
            raise ValueError(f"{where}: no number lies within its bounds")
        return "(?:" + "|".join(f"(?:{p})" for p in parts) + ")"

    def string(self, schema: dict, where: str) -> str:
        if "pattern" in schema and "format" in schema:
            raise Unsupported(f"{where}: pattern and format together are not supported")
        if "format" in schema:
            name = schema["format"]
            if name not in FORMATS:
                raise Unsupported(f"{where}.format: {json.dumps(name)} not supported (supported: {', '.join(FORMATS)})")
            regex, shortest, longest = FORMATS[name]
            lo, hi = self.bounds(schema, "minLength", "maxLength", where, most=None)  # not repeats: any size
            if lo > shortest or (hi is not None and hi < longest):
                raise Unsupported(f"{where}: minLength/maxLength that cut into format {name!r} are not supported")
            return f'"{regex}"'
        lo, hi = self.bounds(schema, "minLength", "maxLength", where)
        if "pattern" in schema:
            if (lo, hi) != (0, None):
                raise Unsupported(f"{where}: pattern with minLength/maxLength is not supported")
            try:
                regex, at_start, at_end = json_string_pattern(schema["pattern"])
            except ValueError as err:
                raise Unsupported(f"{where}.pattern: {err}") from None
            free = f"{STRING_CHAR}*"
            return '"' + ("" if at_start else free) + f"(?:{regex})" + ("" if at_end else free) + '"'
        return '"' + (f"{STRING_CHAR}*" if (lo, hi) == (0, None) else _repeat(STRING_CHAR, lo, hi)) + '"'

    def array(self, schema: dict, where: str, refs: tuple) -> str:
        unique = schema.get("uniqueItems", False)
        if not isinstance(unique, bool):
            raise ValueError(f"{where}.uniqueItems: must be true or false, got {json.dumps(unique)}")  # noqa: TRY004
        if unique:
            return self.unique_array(schema, where, refs)
        prefix = schema.get("prefixItems", [])
        if not isinstance(prefix, list):
            raise ValueError(f"{where}.prefixItems: must be a list of schemas")  # noqa: TRY004 - a bad request
        firsts = [self.regex(s, f"{where}.prefixItems[{i}]", refs) for i, s in enumerate(prefix)]
        more = schema.get("items", False if prefix else None)
        lo, hi = self.bounds(schema, "minItems", "maxItems", where)
        try:
            item = None if more is False else free_value(FREE_DEPTH - 1) if more is None \
                else self.regex(more, f"{where}.items", refs)  # (None: any items, a free-form array)
        except TooDeep:
            if lo > len(firsts):
                raise
            item = None  # (a recursive schema's last level: no more items)
        if item is None and lo > len(firsts):
            raise Unsupported(f"{where}: minItems {lo} is more than its {len(firsts)} prefixItems, with no items schema")
        # the lengths up to the prefix's, then the prefix and as many more items as allowed
        options = [", ".join(firsts[:n]) for n in range(lo, len(firsts) + 1) if hi is None or n <= hi]
        if item is not None and (hi is None or hi > len(firsts)):
            extra = _repeat(", " + item, max(lo - len(firsts), 1) - (0 if firsts else 1),
                            None if hi is None else hi - len(firsts) - (0 if firsts else 1))
            options.append(", ".join(firsts) + ("" if firsts else item) + extra)
        return r"\[(?:" + "|".join(f"(?:{o})" for o in options) + r")\]"

    def unique_array(self, schema: dict, where: str, refs: tuple) -> str:
        """``uniqueItems``: items of a few listed values, each at most once, in the listed order
        (a regular expression cannot remember which it wrote in any order)."""
        if "prefixItems" in schema or "items" not in schema:
            raise Unsupported(f"{where}.uniqueItems: needs an items schema of a few listed values (no prefixItems)")
        values = self.few_values(schema["items"], f"{where}.items", refs)
        lo, hi = self.bounds(schema, "minItems", "maxItems", where)
        if lo > 1 or (hi is not None and hi < len(values)):
            raise Unsupported(f"{where}.uniqueItems: minItems above 1, or maxItems below the {len(values)} values, "
                              "is not supported")
        body = _in_order([(_literal(v), False) for v in values], f"{where}.items")
        return rf"\[(?:{body})\]" if lo else rf"\[(?:{body})?\]"

    @staticmethod
    def bounds(schema: dict, low: str, high: str, where: str, most: int | None = 1000) -> tuple[int, int | None]:
        """A count's bounds (``most``: the largest allowed, as they become repeats of a pattern)."""
        lo, hi = schema.get(low, 0), schema.get(high)
        for name, value in ((low, lo), (high, hi)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value
                                          and (most is None or value <= most)):
                raise ValueError(f"{where}.{name}: must be an integer in [0, {most or 'any'}], got {json.dumps(value)}")
        if hi is not None and hi < lo:
            raise ValueError(f"{where}: {high} {hi} is below {low} {lo}")
        return lo, hi

    def object(self, schema: dict, where: str, refs: tuple) -> str:
        properties = schema.get("properties")
        values = schema.get("additionalProperties")
        if not properties and isinstance(values, dict) and values:  # a map: any keys, values of one schema
            if "required" in schema:
                raise Unsupported(f"{where}.required: needs properties")
            value = self.regex(values, f"{where}.additionalProperties", refs)
            lo, hi = self.bounds(schema, "minProperties", "maxProperties", where)
            if lo > 1:  # a key written twice counts once
                raise Unsupported(f"{where}.minProperties: above 1 is not supported (the output's keys may repeat)")
            pair = f'"{STRING_CHAR}*": {value}'
            if hi == 0:
                return r"\{\}"
            pairs = pair + _repeat(", " + pair, max(lo - 1, 0), None if hi is None else hi - 1)
            return rf"\{{(?:{pairs})?\}}" if lo == 0 else rf"\{{{pairs}\}}"
        if "minProperties" in schema or "maxProperties" in schema:
            raise Unsupported(f"{where}: minProperties/maxProperties are supported on a map (additionalProperties) only")
        if not isinstance(properties, (dict, type(None))):
            raise ValueError(f"{where}.properties: must be an object of schemas")  # noqa: TRY004 - a bad request
        if not properties and values in (None, True, {}):  # a free-form object
            if "required" in schema:
                raise Unsupported(f"{where}.required: the required properties must be listed in properties")
            return free_value(FREE_DEPTH, "object")
        properties = properties or {}  # (none, and no others: "{}")
        required = schema.get("required", [])
        if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
            raise ValueError(f"{where}.required: must be a list of property names")
        missing = sorted(set(required) - set(properties))
        if missing:
            raise ValueError(f"{where}.required: {', '.join(map(repr, missing))} not among the properties")
        items = []
        for name, sub in properties.items():
            try:
                items.append((_literal(name) + ": " + self.regex(sub, f"{where}.properties.{name}", refs),
                              name in required))
            except TooDeep:
                if name in required:
                    raise  # (else a recursive schema's last level: the property is left out)
        body = _in_order(items, f"{where}.properties")
        return rf"\{{(?:{body})\}}" if any(needed for _, needed in items) else rf"\{{(?:{body})?\}}"
