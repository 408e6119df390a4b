"""JSON schemas as patterns (``bora_kernels/serve/json_schema.py``): every match is JSON the schema
accepts, written as ``json.dumps`` writes it; values the schema accepts match and values it
refuses do not (checked with Python's ``re`` and with the guide's own automaton); number ranges
and string formats match exactly what they should; texts drawn at random from the patterns of
real schemas (Pydantic's among them) pass ``jsonschema`` and Pydantic; keywords it cannot keep to
are refused, naming them. (``test_serve_http.py`` checks ``guided_json`` end to end.)"""

from __future__ import annotations

import datetime
import decimal
import email.headerregistry
import enum
import ipaddress
import itertools
import json
import operator
import random
import re
import string
import uuid
from typing import Annotated, Literal

import pytest

from bora_kernels.serve.json_schema import FORMATS, FREE_DEPTH, free_value, integer_range, schema_regex
from bora_kernels.serve.pattern import DEAD, SCHEMA_LIMITS, Pattern

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 5},
    "age": {"type": "integer"},
    "height": {"type": "number"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    "ok": {"type": ["boolean", "null"]},
    "pet": {"$ref": "#/$defs/pet"}},
    "required": ["age"],
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"const": "cat"}, "legs": {"enum": [3, 4]}},
                      "required": ["kind", "legs"], "title": "Pet", "additionalProperties": False}}}

CASES = [  # (schema, values it accepts, values it refuses)
    (PERSON,
     [{"age": 3}, {"name": "bob", "age": -12, "height": 1.5, "tags": [], "ok": None},
      {"age": 0, "tags": ["a", "b", "a"], "ok": True, "pet": {"kind": "cat", "legs": 4}},
      {"name": "x\"y\n", "age": 7, "height": -2e-3}, {"name": "é", "age": 1}],
     [{}, {"name": "bob"}, {"age": 1.5}, {"name": "", "age": 1}, {"name": "toolong", "age": 1},
      {"age": 1, "tags": ["a", "a", "a", "a"]}, {"age": 1, "tags": ["c"]}, {"age": 1, "pet": {"kind": "dog", "legs": 4}},
      {"age": 1, "pet": {"kind": "cat"}}, {"age": "1"}, {"age": 1, "extra": 2}]),
    ({"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}}},
     [{}, {"a": True}, {"b": None}, {"a": False, "b": None}], [{"a": None}, {"b": 1}]),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
     [[1, 2], [0, -5, 10]], [[], [1], [1, 2, 3, 4], [1.5, 2]]),
    ({"anyOf": [{"type": "string", "maxLength": 2}, {"type": "integer"}]}, ["", "ab", 12], ["abc", 1.5, None]),
    ({"enum": ["x", 1, None, True, [1, 2], {"k": "v"}]}, ["x", 1, None, True, [1, 2], {"k": "v"}], ["y", 2, False]),
    ({"type": "array", "items": {"type": "string"}, "maxItems": 0}, [[]], [["a"]]),
    ({"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "exclusiveMaximum": 130},
                                       "delta": {"type": ["integer", "null"], "minimum": -5.5, "maximum": 5}},
      "required": ["age", "delta"]},
     [{"age": 0, "delta": None}, {"age": 129, "delta": -5}, {"age": 42, "delta": 5}],
     [{"age": -1, "delta": 0}, {"age": 130, "delta": 0}, {"age": 5, "delta": -6}, {"age": 5, "delta": 6}]),
    ({"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 2},
     [{}, {"a": 1}, {"é\"": 1, "b": -2}], [{"a": "x"}, {"a": 1, "b": 2, "c": 3}, {"a": 1.5}]),
    ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2, "maxItems": 2},
     [[1, "x"]], [[1], ["x", 1], [1, "x", 2], []]),
    ({"type": "array", "prefixItems": [{"type": "boolean"}], "items": {"type": "integer"}, "maxItems": 3},
     [[], [True], [False, 1, 2]], [[1], [True, "x"], [True, 1, 2, 3]]),
    ({"type": "string", "pattern": "^[A-Z]{2}\\d$"}, ["AB1"], ["AB", "ab1", "AB12", "xAB1"]),
    ({"type": "string", "pattern": "b+c"}, ["bc", "xxbbc", "a\"bcz"], ["b", "cb", ""]),
    ({"type": "string", "format": "date"}, ["2024-02-29", "0001-12-31"], ["2023-02-29", "2024-1-01", "x"]),
    ({"allOf": [{"type": "string", "const": "on"}], "title": "t"}, ["on"], ["off"]),
    ({"anyOf": [{"type": "string", "pattern": "(?=x)x"}, {"type": "null"}]}, [None], ["x"]),
    ({"oneOf": [{"type": "object", "properties": {"t": {"const": "a"}}, "required": ["t"]},
                {"type": "object", "properties": {"t": {"const": "b"}, "n": {"type": "integer"}}, "required": ["t"]}]},
     [{"t": "a"}, {"t": "b", "n": 3}], [{"t": "c"}, {"t": "a", "n": 3}]),
    ({"type": "number", "minimum": 0, "maximum": 1}, [0, 0.5, 1, 1.0, 0.001], [-0.5, 1.5, 2, -1]),
    ({"type": "number"}, [0, -1.5, 1e-05, 1.5e+30, 10**15], ["1", None, True]),
    ({"$ref": "#/$defs/node", "$defs": {"node": {"type": "array", "items": {"$ref": "#/$defs/node"}}}},  # 3 levels
     [[], [[]], [[[]], []]], [[1], [[1]], {}]),
    # free-form values (arrays and objects nested at most FREE_DEPTH deep, test_free_values_nest_...)
    ({"type": "object"}, [{}, {"a": 1}, {"a": {"b": [1, "x", None]}, "": -0.5}, {"é\"": [[]]}], [[], 1, "{}"]),
    ({"type": "object", "additionalProperties": True, "title": "Meta"}, [{"k": True}], [None]),
    ({"type": "array", "maxItems": 2}, [[], [1, {"b": None}], [[1], "x"]], [[1, 2, 3], {}]),
    ({"title": "Any"}, [1, "x", None, [1, {"a": []}], {"a": [1]}], []),
    ({"type": "object", "additionalProperties": False}, [{}], [{"a": 1}]),
    # uniqueItems: each listed value at most once, in the listed order (test_unique_items_...)
    ({"type": "array", "items": {"enum": ["a", "b", 1, True, None]}, "uniqueItems": True},
     [[], ["a"], ["b", True], ["a", "b", 1, True, None]], [["a", "a"], ["c"], [1, 1], [None, None]]),
    ({"type": "array", "items": {"$ref": "#/$defs/c"}, "uniqueItems": True, "minItems": 1,
      "$defs": {"c": {"type": "integer", "enum": [2, 2.0, "x", 3]}}}, [[2], [2, 3], [3]],
     [[], [2, 2], [2, 2.0], ["x"]]),
    ({"type": "array", "items": {"type": "boolean"}, "uniqueItems": True}, [[], [True], [False], [True, False]],
     [[True, True]]),
    ({"type": "object", "properties": {"id": {"type": "integer"}, "data": {}}, "required": ["id", "data"]},
     [{"id": 1, "data": None}, {"id": 2, "data": {"x": [1]}}], [{"id": 1}, {"data": 1}]),
]


@pytest.mark.parametrize("low, high", [(0, 100), (1, 9), (5, 5), (-5, 5), (-120, -7), (None, -3), (None, 12), (7, None),
                                       (0, None), (None, None), (-1, 0), (13, 987), (199, 2001), (-1000, None)])
def test_integer_ranges_match_exactly_their_integers(low, high):
    """Every integer from -2500 to 2500 and some large ones match exactly when within the bounds;
    leading zeros, "-0" and "+" never do (JSON writes none of them)."""
    python, pattern = re.compile(integer_range(low, high)), Pattern(integer_range(low, high))
    for x in [*range(-2500, 2501), 10**9, -10**9, 10**12 + 7]:
        inside = (low is None or x >= low) and (high is None or x <= high)
        assert bool(python.fullmatch(str(x))) == inside == pattern.fullmatch(str(x)), x
    assert not any(python.fullmatch(t) for t in ("-0", "00", "01", "-01", "+1", ""))


@pytest.mark.parametrize("schema, good, bad", CASES, ids=range(len(CASES)))
def test_schema_patterns_match_exactly_the_values_the_schema_accepts(schema, good, bad):
    regex = schema_regex(schema)
    pattern = Pattern(regex, SCHEMA_LIMITS)
    assert schema_regex(json.dumps(schema)) == regex  # (the schema as JSON text)
    for value in good:
        text = json.dumps(value)
        assert re.fullmatch(regex, text) and pattern.fullmatch(text), text
    for value in bad:
        text = json.dumps(value)
        assert not re.fullmatch(regex, text) and not pattern.fullmatch(text), text
    assert not pattern.fullmatch(json.dumps(good[0], indent=1) + " ")  # json.dumps' spacing only


@pytest.mark.parametrize("schema, message", [
    ({"type": "number", "minimum": 1e-20}, "schema: bounds with over 16 digits after the point"),
    ({"type": "number", "minimum": 1e17}, "schema: bounds that leave only numbers of over 16 digits"),
    ({"type": "number", "minimum": 0.001, "exclusiveMaximum": 10**12}, "counted in steps of the bounds' last decimal"),
    ({"type": "number", "multipleOf": 0.01}, "'multipleOf' not supported"),
    ({"enum": [1, 20], "maximum": 10}, "bounds are supported beside an integer or number type only"),
    ({"type": "number", "minimum": 2, "exclusiveMaximum": 2}, "no number lies within its bounds"),
    ({"type": "number", "exclusiveMaximum": 10**15}, "must be under 10**14"),
    ({"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 4}, "no integer lies within its bounds"),
    ({"type": "integer", "minimum": True}, "minimum: must be a number"),
    ({"type": "integer", "multipleOf": 2}, "'multipleOf' not supported"),
    ({"type": "object", "properties": {"d": {"type": "string", "format": "hostname"}}},
     'schema.properties.d.format: "hostname" not supported'),
    ({"type": "string", "format": "date", "maxLength": 9}, "maxLength that cut into format 'date'"),
    ({"type": "string", "format": "uuid", "pattern": "a"}, "pattern and format together"),
    ({"type": "string", "pattern": "a", "maxLength": 3}, "pattern with minLength/maxLength"),
    ({"type": "string", "pattern": "(?=a)b"}, "schema.pattern: '(?=' (look-arounds"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "schema.items: uniqueItems is supported on"),
    ({"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True, "minItems": 2}, "minItems above 1"),
    ({"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True, "maxItems": 2}, "maxItems below the 3"),
    ({"type": "array", "prefixItems": [{"const": 1}], "uniqueItems": True}, "needs an items schema"),
    ({"type": "array", "items": {"const": 1}, "uniqueItems": "yes"}, "uniqueItems: must be true or false"),
    ({"type": "array", "items": {"$ref": "#/$defs/gone"}, "uniqueItems": True}, "'#/$defs/gone' is not in the schema"),
    ({"allOf": [{"type": "integer"}, {"type": "number"}]}, "allOf: only one schema"),
    ({"enum": ["a", "bb"], "maxLength": 1}, "'maxLength' beside 'enum' not supported"),
    ({"type": "string", "enum": [1, None]}, "no value of its enum is of its type"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf: [0] and [1] can match the same text"),
    ({"oneOf": [{"type": "string", "maxLength": 3}, {"type": "string", "pattern": "^abc"}]}, "[0] and [1] can match"),
    ({"anyOf": [{"type": "string", "format": "hostname"}, {"type": "integer", "multipleOf": 2}]},
     "anyOf[0].format"),  # none left
    ({"type": "object", "required": ["a"]}, "schema.required: the required properties must be listed in properties"),
    ({"type": "object", "properties": [1]}, "schema.properties: must be an object of schemas"),
    ({"type": "object", "properties": {"a": {"type": "null"}}, "maxProperties": 1}, "on a map (additionalProperties) only"),
    ({"type": "object", "additionalProperties": {"type": "null"}, "minProperties": 2}, "minProperties: above 1"),
    ({"type": "array", "prefixItems": [{"type": "null"}], "minItems": 2}, "minItems 2 is more than its 1 prefixItems"),
    ({"properties": {"a": {"type": "null"}}}, "needs a type"),
    ({"type": "decimal"}, '"decimal" is not a JSON schema type'),
    ({"$ref": "#/$defs/node", "$defs": {"node": {"type": "array", "items": {"$ref": "#/$defs/node"}, "minItems": 1}}},
     "refers back to itself at every level"),
    ({"$ref": "#/$defs/none"}, "is not in the schema"),
    ({"$ref": "other.json#/a"}, "only '#/$defs/NAME'"),
    ({"type": "object", "properties": {"a": {"type": "null"}}, "required": ["b"]}, "'b' not among the properties"),
    ({"type": "string", "maxLength": -1}, "maxLength: must be an integer"),
    ({"type": "array", "items": {"type": "null"}, "minItems": 3, "maxItems": 2}, "maxItems 2 is below minItems 3"),
    ({"enum": []}, "enum: must be a non-empty list"),
    ("{oops", "not valid JSON"), ([1], "must be a JSON schema"),
])
def test_schemas_it_cannot_keep_to_are_refused(schema, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        schema_regex(schema)


@pytest.mark.parametrize("bounds", [{"minimum": 0, "maximum": 1}, {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
                                    {"minimum": -2, "exclusiveMaximum": 3}, {"maximum": -1}, {"exclusiveMaximum": 0},
                                    {"minimum": 5}, {"minimum": -3, "maximum": -3.0}, {"exclusiveMinimum": -1},
                                    {"minimum": 0, "exclusiveMinimum": 0, "maximum": 10, "exclusiveMaximum": 7},
                                    {"minimum": 0.25, "maximum": 0.75}, {"exclusiveMinimum": -0.5, "exclusiveMaximum": 2.05},
                                    {"minimum": 0.001}, {"maximum": -1.5}, {"exclusiveMaximum": 0.1},
                                    {"exclusiveMinimum": 9.999, "maximum": 12.5}, {"minimum": -0.05, "maximum": 0.05},
                                    {"exclusiveMinimum": 0.05, "exclusiveMaximum": 0.051}, {"minimum": 2.5, "maximum": 2.5}],
                         ids=lambda b: json.dumps(b))
def test_number_ranges_match_exactly_their_decimals(bounds):
    """Decimals from -12.999 to 12.999 with fractions of up to 4 digits match exactly when within
    the bounds, read as validators read them (Python's ``json``: a float with a point, an int
    without; a bound such as 0.1 is a double); "-0" forms, leading zeros and exponents never do
    (the output keeps to plain decimals); one with a long fraction that matches is within the
    bounds once read as a double ("0.9999999999999999999" is 1.0)."""
    regex = schema_regex({"type": "number", **bounds})
    python, pattern = re.compile(regex), Pattern(regex)

    def within(value) -> bool:
        return all(check(value, bounds[name]) for name, check in (
            ("minimum", operator.ge), ("maximum", operator.le), ("exclusiveMinimum", operator.gt),
            ("exclusiveMaximum", operator.lt)) if name in bounds)

    for whole in [*map(str, range(-12, 13)), "-0"]:
        for fraction in ("", ".0", ".5", ".05", ".000", ".9", ".001", ".50", ".25", ".75", ".249", ".2501", ".051",
                         ".049", ".0505", ".1", ".0999", ".999", ".9991", ".05001"):
            text = whole + fraction
            value = json.loads(text)
            expected = within(value) and not (text.startswith("-") and value == 0)
            assert bool(python.fullmatch(text)) == expected == pattern.fullmatch(text), text
    assert not any(python.fullmatch(t) for t in ("00.5", "01", "1e0", "5E-1", ".5", "1.", "+1"))
    for whole in range(-12, 13):  # long fractions: a match still keeps to the bounds once read as a double
        for fraction in (".0000000000000000001", ".9999999999999999999", ".00000000000001", ".99999999999999",
                         ".0500000000000000001", ".0509999999999999999", ".0999999999999999999"):
            for text in (f"{whole}{fraction}", f"-{abs(whole)}{fraction}"):
                if python.fullmatch(text):
                    assert within(json.loads(text)), text
    unbounded = re.compile(schema_regex({"type": "number"}))  # finite doubles only: no "1e400" (inf to a reader)
    assert unbounded.fullmatch("9" * 16 + ".5e99") and not any(unbounded.fullmatch(t) for t in ("1e400", "1" + "0" * 16))


def test_formats_match_what_python_parses():
    """``date``: every text YYYY-MM-DD of four years (leap and not) matches exactly when it is a
    date; ``time``, ``ipv4``, ``uuid``: over grids, a match always parses, and the usual forms match."""
    date = re.compile(FORMATS["date"][0])
    for year in ("1900", "2000", "2023", "2024", "0000", "0001", "9999"):
        for month in range(14):
            for day in range(33):
                text = f"{year}-{month:02d}-{day:02d}"
                try:
                    datetime.date.fromisoformat(text)
                    valid = True
                except ValueError:
                    valid = False
                assert bool(date.fullmatch(text)) == valid, text
    time = re.compile(FORMATS["time"][0])
    for hms in ("00:00:00", "23:59:59", "24:00:00", "12:60:00", "12:00:60", "1:00:00"):
        for fraction in ("", ".5", ".123456", ".1234567"):
            for zone in ("", "Z", "+05:30", "-23:59", "+24:00", "z", "+0530"):
                text = hms + fraction + zone
                if time.fullmatch(text):
                    assert datetime.time.fromisoformat(text.replace("Z", "+00:00")).tzinfo is not None, text
    for text in ("00:00:00Z", "23:59:59.123456+05:30", "08:15:00-07:00"):
        assert time.fullmatch(text) and re.fullmatch(FORMATS["date-time"][0], "2024-02-29T" + text)
    ipv4 = re.compile(FORMATS["ipv4"][0])
    octets = ("0", "1", "9", "10", "99", "100", "199", "200", "249", "250", "255", "256", "300", "01", "001")
    for a in octets:
        for b in octets:
            text = f"{a}.1.{b}.0"
            try:
                ipaddress.IPv4Address(text)
                valid = True
            except ValueError:
                valid = False
            assert bool(ipv4.fullmatch(text)) == valid, text
    rng = random.Random(0)
    for _ in range(50):
        text = str(uuid.UUID(int=rng.getrandbits(128)))
        assert re.fullmatch(FORMATS["uuid"][0], text) and not re.fullmatch(FORMATS["uuid"][0], text.upper() + "0")
    for name, (regex, shortest, longest) in FORMATS.items():  # the lengths minLength/maxLength are held to
        assert _match_lengths(Pattern(regex), longest + 1) == (shortest, longest), name


def _match_lengths(pattern: Pattern, limit: int) -> tuple[int, int]:
    """The shortest and longest match, walking every string level by level (one character of each
    stretch of code points that the pattern's sets do not split); fails past ``limit``."""
    alphabet = pattern.alphabet()
    level, lengths, length = {pattern.start}, [], 0
    while level:
        assert length <= limit, "matches longer than the limit"
        if any(pattern.accepts(s) for s in level):
            lengths.append(length)
        level = {t for s in level for ch in alphabet if (t := pattern.step(s, ch)) != DEAD}
        length += 1
    return lengths[0], lengths[-1]


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


def _pydantic_order():
    """A Pydantic model with the field types its schemas bring: formats, bounds, a pattern, an
    optional field, Decimal, a map, a tuple, an enum, a discriminated union, a list of models."""
    pydantic = pytest.importorskip("pydantic")
    BaseModel, Field, AnyUrl = pydantic.BaseModel, pydantic.Field, pydantic.AnyUrl

    class Cat(BaseModel):
        kind: Literal["cat"]
        legs: Annotated[int, Field(ge=0, le=4)]

    class Dog(BaseModel):
        kind: Literal["dog"]
        good: bool

    class Order(BaseModel):
        id: uuid.UUID
        placed: datetime.datetime
        day: datetime.date
        at: datetime.time
        score: Annotated[float, Field(ge=0, le=1)]
        rate: Annotated[float, Field(gt=0.05, le=99.5)]
        code: Annotated[str, Field(pattern=r"^[A-Z]{2}-\d{3}$")]
        note: str | None = None
        price: decimal.Decimal
        counts: dict[str, int]
        pair: tuple[int, str]
        color: Color
        pet: Cat | Dog = Field(discriminator="kind")
        pets: list[Cat] = Field(max_length=2)
        site: AnyUrl
        addr: ipaddress.IPv4Address
        contact: Annotated[str, Field(json_schema_extra={"format": "email"})]

    return Order


SAMPLED = [  # schemas whose patterns are sampled at random (and the Pydantic model's, below)
    PERSON,
    {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"}, "has": {"type": "string", "pattern": "ab+c"},
        "mail": {"type": "string", "pattern": "\\S+@\\S+"}, "odd": {"type": "string", "pattern": "^\\W\\D.$"},
        "not": {"type": "string", "pattern": "[^a-z]{3}$"}, "end": {"type": "string", "pattern": "^(?:x|yz)|q$"}},
     "required": ["code", "has", "mail", "odd", "not", "end"]},
    {"type": "object", "properties": {name: {"type": "string", "format": name} for name in FORMATS},
     "required": list(FORMATS)},
    {"type": "array", "items": {"type": "number", "minimum": -5, "exclusiveMaximum": 5}, "minItems": 1},
    {"type": "object", "additionalProperties": {"type": ["integer", "null"]}, "minProperties": 1, "maxProperties": 3},
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "string", "maxLength": 2}],
     "items": {"type": "integer", "minimum": 10}, "maxItems": 4},
    {"oneOf": [{"type": "object", "properties": {"t": {"const": "a"}, "n": {"type": "number"}}, "required": ["t"]},
               {"type": "object", "properties": {"t": {"const": "b"}}, "required": ["t"]}]},
    {"$ref": "#/$defs/tree", "$defs": {"tree": {"type": "object", "properties": {
        "v": {"type": "integer"}, "left": {"$ref": "#/$defs/tree"},
        "right": {"anyOf": [{"$ref": "#/$defs/tree"}, {"type": "null"}]}}, "required": ["v", "right"]}}},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["x", "y", 1, True, None, [1]]},
                                               "uniqueItems": True, "minItems": 1}},
     "required": ["tags"]},
    {"type": "object", "properties": {"meta": {"type": "object"}, "any": {"title": "Any"},
                                      "list": {"type": "array", "maxItems": 3}}, "required": ["meta", "any", "list"]},
]
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " é٣\u00a0\u2028"
WEIGHTS = [12 if ch in '"{}[],:-' else 1 for ch in ALPHABET]


def _draw(pattern: Pattern, rng: random.Random, wander: int = 400) -> str | None:
    """A match drawn at random, character by character among those the pattern allows next; past
    ``wander`` characters, among those that bring a match nearest."""
    state, text, distance = pattern.start, [], {}
    while True:
        if pattern.accepts(state) and (pattern.complete(state) or rng.random() < 0.3 or len(text) >= wander):
            return "".join(text)
        allowed = [(ch, w, after) for ch, w in zip(ALPHABET, WEIGHTS) if (after := pattern.step(state, ch)) != DEAD]
        if not allowed:  # a character outside the alphabet is needed
            return None
        if len(text) >= wander:
            nearest = min(_to_match(pattern, after, distance) for _, _, after in allowed)
            allowed = [a for a in allowed if _to_match(pattern, a[2], distance) == nearest]
        ch, _, state = rng.choices(allowed, [w for _, w, _ in allowed])[0]
        text.append(ch)


def _to_match(pattern: Pattern, state: int, distance: dict) -> int:
    """The fewest characters (of the alphabet) from ``state`` to a match."""
    if state not in distance:
        level, seen, steps = {state}, {state}, 0
        while not any(pattern.accepts(s) for s in level):
            level = {t for s in level for ch in ALPHABET if (t := pattern.step(s, ch)) != DEAD} - seen
            seen |= level
            steps += 1
            assert level, "no match reachable with the alphabet"
        distance[state] = steps
    return distance[state]


def _pydantic_tree():
    """A recursive Pydantic model: a list of its own kind and an optional one."""
    pydantic = pytest.importorskip("pydantic")

    class Node(pydantic.BaseModel):
        name: str
        children: list[Node] = pydantic.Field(default_factory=list)
        parent: Node | None = None

    Node.model_rebuild(_types_namespace={"Node": Node})
    return Node


@pytest.mark.parametrize("which", [*range(len(SAMPLED)), "pydantic", "pydantic-tree"])
def test_random_matches_are_valid_json_of_the_schema(which):
    """40 texts drawn at random from a schema's pattern each parse as JSON that ``jsonschema``
    accepts (formats checked: date, time, date-time, ipv4, uuid; emails with the standard
    library's address parser), and for the Pydantic models, that Pydantic accepts."""
    jsonschema = pytest.importorskip("jsonschema")
    model = {"pydantic": _pydantic_order, "pydantic-tree": _pydantic_tree}.get(which, lambda: None)()
    schema = model.model_json_schema() if model else SAMPLED[which]
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    pattern, rng, drawn = Pattern(schema_regex(schema), SCHEMA_LIMITS), random.Random(str(which)), []
    while len(drawn) < 40:
        text = _draw(pattern, rng)
        if text is not None:
            drawn.append(text)
    for text in drawn:
        value = json.loads(text)
        validator.validate(value)
        if model is not None:
            model.model_validate_json(text)
        for found in _emails(value, which):
            address = email.headerregistry.Address(addr_spec=found)
            assert address.addr_spec == found, found


@pytest.mark.parametrize("required", [(), ("c",), ("a", "d"), ("b", "c", "e"), ("a", "b", "c", "d", "e")])
def test_objects_match_every_subset_of_properties_that_holds_the_required_ones(required):
    """An object of 5 properties matches, in the listed order, exactly the subsets that hold
    every required one (all 32 tried)."""
    names = "abcde"
    schema = {"type": "object", "properties": {n: {"type": "integer"} for n in names}, "required": list(required)}
    python = re.compile(schema_regex(schema))
    for n in range(len(names) + 1):
        for chosen in itertools.combinations(names, n):
            text = json.dumps({name: i for i, name in enumerate(chosen)})
            assert bool(python.fullmatch(text)) == (set(required) <= set(chosen)), text


def test_optional_properties_grow_the_pattern_linearly():
    """Each optional property is written at most twice: 40 take under 5 times the pattern of 10
    (quadratic growth would be about 16 times), 6 optional free-form values fit in a schema's
    limits, and 151 optional properties before the first required one are refused."""
    sizes = [len(schema_regex({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(k)}}))
             for k in (10, 40)]
    assert sizes[1] < 5 * sizes[0], sizes  # (quadratic would be about 16x)
    free = Pattern(schema_regex({"type": "object", "properties": {f"f{i}": {} for i in range(6)}}), SCHEMA_LIMITS)
    assert free.fullmatch('{"f2": [1, {"a": null}], "f5": "x"}') and free.size < 200_000
    with pytest.raises(ValueError, match="over 150 optional properties"):
        schema_regex({"type": "object", "properties": {f"p{i}": {"type": "null"} for i in range(151)}})


def test_unique_items_match_each_value_at_most_once_in_the_listed_order():
    """An array of distinct values from a 4-value enum matches exactly when its values keep the
    enum's order (every ordering of every subset tried), and with ``minItems`` 1 the same but for
    the empty array; Pydantic's ``set[Literal[...]]``: its schema's values, in order, pass."""
    values = ["x", 2, False, None]
    for lo in (0, 1):
        python = re.compile(schema_regex({"type": "array", "items": {"enum": values}, "uniqueItems": True, "minItems": lo}))
        for n in range(len(values) + 1):
            for chosen in itertools.permutations(values, n):
                ordered = list(chosen) == [v for v in values if v in chosen]
                assert bool(python.fullmatch(json.dumps(list(chosen)))) == (ordered and n >= lo), chosen
    pydantic = pytest.importorskip("pydantic")
    tags = pydantic.TypeAdapter(set[Literal["red", "green", "blue"]])
    regex = re.compile(schema_regex(tags.json_schema()))
    assert regex.fullmatch('["red", "blue"]') and tags.validate_json('["red", "blue"]') == {"red", "blue"}


def _depth(value) -> int:
    """How deep ``value``'s arrays and objects nest, itself included."""
    inner = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else None
    return 0 if inner is None else 1 + max(map(_depth, inner), default=0)


def test_free_values_nest_arrays_and_objects_at_most_free_depth_deep():
    """A free-form value's pattern (a schema ``{}``; objects, arrays with no properties or items
    listed) matches a JSON value exactly when its arrays and objects nest at most ``FREE_DEPTH``
    deep: 300 random values, nested up to 5 deep, of every kind."""
    rng = random.Random(0)

    def value(depth: int):
        kind = rng.choice(["scalar", "array", "object"] if depth else ["scalar"])
        if kind == "scalar":
            return rng.choice([None, True, False, 0, -12, 3.25, 1e-7, "", "a\"b\\c", "é\n"])
        items = [value(depth - 1) for _ in range(rng.randint(0, 3))]
        return items if kind == "array" else {rng.choice(["k", "", "é", f"k{i}"]): v for i, v in enumerate(items)}

    python = re.compile(free_value())
    pattern = Pattern(free_value(), SCHEMA_LIMITS)
    objects, arrays = re.compile(schema_regex({"type": "object"})), re.compile(schema_regex({"type": "array"}))
    depths = set()
    for _ in range(300):
        v = value(5)
        text, depth = json.dumps(v), _depth(v)
        depths.add(depth)
        assert bool(python.fullmatch(text)) == (depth <= FREE_DEPTH) == pattern.fullmatch(text), text
        assert bool(objects.fullmatch(text)) == (isinstance(v, dict) and depth <= FREE_DEPTH), text
        assert bool(arrays.fullmatch(text)) == (isinstance(v, list) and depth <= FREE_DEPTH), text
    assert depths >= set(range(FREE_DEPTH + 2)), depths


def _emails(value, which):
    if which == 2:
        yield value["email"]
    if which == "pydantic":
        yield value["contact"]


def test_pydantic_values_written_as_json_dumps_match():
    """A Pydantic model's value, dumped as JSON (``json.dumps`` of ``model_dump(mode="json")``),
    matches its schema's pattern, but for Decimal, written as a number (its string form's
    pattern has a look-ahead, so that alternative is left out)."""
    order = _pydantic_order()
    value = order(id=uuid.UUID(int=7), placed=datetime.datetime(2024, 2, 29, 12, tzinfo=datetime.timezone.utc),
                  day=datetime.date(2023, 1, 31), at=datetime.time(1, 2, 3, 500000, tzinfo=datetime.timezone.utc),
                  score=0.5, rate=0.0501, code="AB-123", price=decimal.Decimal("1.5"), counts={"a": 1, "é": -2}, pair=(1, "x"),
                  color=Color.GREEN, pet={"kind": "dog", "good": True}, pets=[{"kind": "cat", "legs": 4}],
                  site="https://example.com/a?b=c", addr="10.0.0.1", contact="ann.lee@mail.example.org")
    text = json.dumps(value.model_dump(mode="json")).replace('"price": "1.5"', '"price": 1.5')
    assert Pattern(schema_regex(order.model_json_schema()), SCHEMA_LIMITS).fullmatch(text), text
