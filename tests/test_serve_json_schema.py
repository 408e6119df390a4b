"""JSON schemas as patterns (``bora_kernels/serve/json_schema.py``): every match is JSON the schema
accepts, written as ``json.dumps`` writes it; values the schema accepts match and values it
refuses do not (checked with Python's ``re`` and with the guide's own automaton); keywords it
cannot keep to are refused, naming them. (``test_serve_http.py`` checks ``guided_json`` end to end.)"""

from __future__ import annotations

import json
import re

import pytest

from bora_kernels.serve.json_schema import integer_range, schema_regex
from bora_kernels.serve.pattern import Pattern

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
    pattern = Pattern(regex)
    assert schema_regex(json.dumps(schema)) == regex  # (the schema as JSON text)
    for value in good:
        text = json.dumps(value)
        assert re.fullmatch(regex, text) and pattern.fullmatch(text), text
    for value in bad:
        text = json.dumps(value)
        assert not re.fullmatch(regex, text) and not pattern.fullmatch(text), text
    assert not pattern.fullmatch(json.dumps(good[0], indent=1) + " ")  # json.dumps' spacing only


@pytest.mark.parametrize("schema, message", [
    ({"type": "number", "minimum": 0}, "schema: bounds on a number are not supported"),
    ({"enum": [1, 20], "maximum": 10}, "bounds are supported on an integer type only"),
    ({"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 4}, "no integer lies within its bounds"),
    ({"type": "integer", "minimum": True}, "minimum: must be a number"),
    ({"type": "integer", "multipleOf": 2}, "'multipleOf' not supported"),
    ({"type": "object", "properties": {"d": {"type": "string", "format": "date"}}}, "schema.properties.d: 'format'"),
    ({"type": "string", "pattern": "a+"}, "'pattern' not supported"),
    ({"allOf": [{"type": "integer"}]}, "'allOf' not supported"),
    ({"type": "object"}, "needs its properties listed"),
    ({}, "allows any JSON value"),
    ({"type": "array"}, "needs its items' schema"),
    ({"description": "no type"}, "needs a type"),
    ({"type": "decimal"}, '"decimal" is not a JSON schema type'),
    ({"$ref": "#/$defs/node", "$defs": {"node": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}, "refers back"),
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
