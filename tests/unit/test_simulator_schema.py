"""Values made for JSON schemas validate against them (checked with the jsonschema package)."""

from __future__ import annotations

import random
from typing import Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from docqueue.workers.testing.simulator.schema import SchemaError, instance


class Address(BaseModel):
    street: str = Field(min_length=3, max_length=40)
    zip_code: str = Field(min_length=5, max_length=5)


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=120)
    height_m: float = Field(gt=0.5, lt=2.5)
    role: Literal["author", "editor"]
    tags: list[str] = Field(min_length=1, max_length=4)
    address: Address
    previous: list[Address] = Field(default_factory=list, max_length=2)
    manager: Person | None = None
    active: bool = True


SCHEMAS: dict[str, dict[str, Any]] = {
    "scalars": {
        "type": "object",
        "properties": {
            "s": {"type": "string", "minLength": 12, "maxLength": 15},
            "i": {"type": "integer", "minimum": -5, "maximum": -3},
            "n": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "b": {"type": "boolean"},
            "z": {"type": "null"},
            "m": {"type": "integer", "multipleOf": 7, "minimum": 1, "maximum": 30},
        },
        "required": ["s", "i", "n", "b", "z", "m"],
        "additionalProperties": False,
    },
    "enum_const_lists": {
        "type": "object",
        "properties": {
            "e": {"enum": ["red", 3, None]},
            "c": {"const": {"fixed": [1, 2]}},
            "t": {"type": ["string", "integer", "null"]},
            "u": {
                "type": "array",
                "items": {"type": "integer"},
                "uniqueItems": True,
                "minItems": 3,
                "maxItems": 3,
            },
            "p": {
                "type": "array",
                "prefixItems": [{"type": "string"}, {"type": "boolean"}],
                "items": False,
                "minItems": 2,
            },
        },
        "required": ["e", "c", "t", "u", "p"],
    },
    "composition": {
        "type": "object",
        "properties": {
            "any": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer"}]},
            "one": {"oneOf": [{"type": "boolean"}, {"type": "null"}]},
            "all": {
                "allOf": [
                    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                    {"properties": {"b": {"type": "string"}}, "required": ["b"]},
                ]
            },
            "formats": {
                "type": "object",
                "properties": {
                    "d": {"type": "string", "format": "date-time"},
                    "u": {"type": "string", "format": "uuid"},
                },
                "required": ["d", "u"],
            },
            "map": {
                "type": "object",
                "additionalProperties": {"type": "integer"},
                "minProperties": 2,
            },
        },
        "required": ["any", "one", "all", "formats", "map"],
    },
    "pydantic_nested_recursive": Person.model_json_schema(),
    "top_level_array": {
        "type": "array",
        "items": {"$ref": "#/$defs/x"},
        "minItems": 1,
        "$defs": {"x": {"type": "string", "enum": ["a", "b"]}},
    },
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_instances_validate_for_many_seeds(name: str) -> None:
    # Given a schema
    schema = SCHEMAS[name]
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    for seed in range(200):
        # When a value is made with this seed
        value = instance(schema, random.Random(seed))
        # Then the schema accepts it
        errors = [e.message for e in validator.iter_errors(value)]
        assert errors == [], f"seed {seed}: {value!r}"


def test_same_seed_same_value_and_seeds_vary() -> None:
    # Given the nested pydantic schema
    schema = SCHEMAS["pydantic_nested_recursive"]
    # When values are made from equal and from different seeds
    first = instance(schema, random.Random(1))
    again = instance(schema, random.Random(1))
    others = {repr(instance(schema, random.Random(s))) for s in range(2, 12)}
    # Then equal seeds agree and different seeds mostly differ
    assert first == again
    assert len(others) >= 8


def test_recursive_schema_terminates() -> None:
    # Given a tree whose children are trees, with no null escape
    schema = {
        "$ref": "#/$defs/node",
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["children"],
            }
        },
    }
    # When values are made
    for seed in range(20):
        value = instance(schema, random.Random(seed))
        # Then they are finite and valid
        jsonschema.validate(value, schema)


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "string", "minLength": 5, "maxLength": 2}, "maxLength 2 is below minLength 5"),
        ({"type": "integer", "minimum": 3, "maximum": 1}, "no integer between"),
        ({"$ref": "#/$defs/missing"}, "points nowhere"),
        ({"$ref": "https://example.com/x.json"}, "only local $ref"),
        ({"type": "widget"}, "unknown type 'widget'"),
        ({"enum": []}, "enum must be a non-empty list"),
        (False, "admits no value"),
    ],
)
def test_impossible_schemas_say_why(schema: Any, words: str) -> None:
    # When a value is asked for an unsatisfiable or unsupported schema
    with pytest.raises(SchemaError, match=words.replace("$", r"\$")):
        instance(schema, random.Random(0))
