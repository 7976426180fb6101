"""Make a JSON value that validates against a JSON schema, drawn from a seeded RNG.

Supported: type (a name or a list), const, enum, object (properties, required,
additionalProperties, min/maxProperties), string (minLength, maxLength, a few formats),
integer and number (minimum, maximum, exclusive bounds, multipleOf), boolean, null,
array (items, prefixItems, minItems, maxItems, uniqueItems), anyOf and oneOf (one branch is
picked), allOf (merged), and local $ref into $defs/definitions. `pattern` and `not` are
ignored: a value is not checked against them.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from docqueue.workers.testing.simulator.words import words

# Past this depth, recursion is cut short: optional properties and optional items are left out
# and a null branch is preferred, so that recursive schemas end.
MAX_DEPTH = 8
_COMPOSITE = ("anyOf", "oneOf")
_FORMATS = frozenset({"date", "date-time", "time", "email", "uri", "uuid"})


class SchemaError(ValueError):
    """The schema cannot be satisfied or is not a schema; the message says where."""


def instance(schema: Any, rng: random.Random) -> Any:
    """A value valid against `schema` (a JSON-schema object)."""
    return _Maker(schema, rng).make(schema, 0, "#")


class _Maker:
    def __init__(self, root: Any, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.by_type: dict[str, Callable[[Mapping[str, Any], int, str], Any]] = {
            "object": self._object,
            "array": self._array,
            "string": self._string,
            "integer": self._integer,
            "number": self._number,
            "boolean": lambda s, d, p: self.rng.random() < 0.5,
            "null": lambda s, d, p: None,
        }

    def make(self, schema: Any, depth: int, where: str) -> Any:
        if schema is True:
            return self._phrase(1, 3)
        if schema is False:
            raise SchemaError(f"{where}: a `false` schema admits no value")
        if not isinstance(schema, Mapping):
            raise SchemaError(f"{where}: a schema must be an object, got {type(schema).__name__}")
        if depth > 4 * MAX_DEPTH:
            raise SchemaError(f"{where}: the schema nests too deeply (a $ref loop?)")
        if "$ref" in schema:
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            return self.make({**self._resolve(schema["$ref"], where), **siblings}, depth + 1, where)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            options = schema["enum"]
            if not isinstance(options, list) or not options:
                raise SchemaError(f"{where}: enum must be a non-empty list")
            return self.rng.choice(options)
        if "allOf" in schema:
            return self.make(self._merge_all(schema, where), depth + 1, where)
        for key in _COMPOSITE:
            if key in schema:
                return self.make(self._pick_branch(schema, key, depth, where), depth + 1, where)
        kind = self._type_of(schema, depth, where)
        return self.by_type[kind](schema, depth, where)

    # Composition ---------------------------------------------------------------------------

    def _resolve(self, ref: Any, where: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"{where}: only local $ref ('#/...') is supported, got {ref!r}")
        node = self.root
        for part in filter(None, ref[1:].split("/")):
            key = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or key not in node:
                raise SchemaError(f"{where}: $ref {ref!r} points nowhere")
            node = node[key]
        return node

    def _merge_all(self, schema: Mapping[str, Any], where: str) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            if isinstance(part, Mapping) and "$ref" in part:
                part = {**self._resolve(part["$ref"], where), **part}
                part.pop("$ref")
            if not isinstance(part, Mapping):
                continue
            for key, value in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required":
                    merged["required"] = sorted({*merged.get("required", []), *value})
                else:
                    merged.setdefault(key, value)
        return merged

    def _pick_branch(
        self, schema: Mapping[str, Any], key: str, depth: int, where: str
    ) -> dict[str, Any]:
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise SchemaError(f"{where}: {key} must be a non-empty list")
        nulls = [b for b in branches if isinstance(b, Mapping) and b.get("type") == "null"]
        chosen = nulls[0] if depth >= MAX_DEPTH and nulls else self.rng.choice(branches)
        if isinstance(chosen, Mapping) and "$ref" in chosen:
            chosen = {**self._resolve(chosen["$ref"], where), **chosen}
            chosen.pop("$ref")
        if not isinstance(chosen, Mapping):
            chosen = {}
        outer = {k: v for k, v in schema.items() if k != key and k not in ("default", "title")}
        return {**outer, **chosen}

    def _type_of(self, schema: Mapping[str, Any], depth: int, where: str) -> str:
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise SchemaError(f"{where}: type must not be an empty list")
            kind = "null" if depth >= MAX_DEPTH and "null" in kind else self.rng.choice(kind)
        if kind is None:
            if "properties" in schema or "additionalProperties" in schema:
                return "object"
            if "items" in schema or "prefixItems" in schema:
                return "array"
            if "minimum" in schema or "maximum" in schema:
                return "number"
            return "string"
        if kind not in self.by_type:
            raise SchemaError(f"{where}: unknown type {kind!r}")
        return str(kind)

    # Kinds ---------------------------------------------------------------------------------

    def _object(self, schema: Mapping[str, Any], depth: int, where: str) -> dict[str, Any]:
        properties: Mapping[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        extra = schema.get("additionalProperties", True)
        out: dict[str, Any] = {}
        for name, sub in properties.items():
            if name in required or (depth < MAX_DEPTH and self.rng.random() < 0.7):
                out[name] = self.make(sub, depth + 1, f"{where}/properties/{name}")
        for name in sorted(required - set(out)):
            out[name] = self.make(extra if isinstance(extra, Mapping) else True, depth + 1, where)
        wanted = int(schema.get("minProperties", 0))
        if not properties and isinstance(extra, Mapping) and depth < MAX_DEPTH:
            wanted = max(wanted, self.rng.randint(1, 2))
        limit = schema.get("maxProperties")
        if limit is not None:
            wanted = min(wanted, int(limit))
        index = 0
        while len(out) < wanted and extra is not False:
            index += 1
            key = f"{self._phrase(1, 1)}_{index}"
            out[key] = self.make(extra if isinstance(extra, Mapping) else True, depth + 1, where)
        return out

    def _array(self, schema: Mapping[str, Any], depth: int, where: str) -> list[Any]:
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", True)
        low = int(schema.get("minItems", 0))
        high = schema.get("maxItems")
        high = low + 3 if high is None else int(high)
        if high < low:
            raise SchemaError(f"{where}: maxItems {high} is below minItems {low}")
        if items is False:
            high = min(high, len(prefix))
        count = low if depth >= MAX_DEPTH else self.rng.randint(low, min(high, low + 3))
        out: list[Any] = []
        seen: set[str] = set()
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else items
            value = self.make(sub, depth + 1, f"{where}/items")
            for _ in range(10 if schema.get("uniqueItems") else 0):
                if repr(value) not in seen:
                    break
                value = self.make(sub, depth + 1, f"{where}/items")
            seen.add(repr(value))
            out.append(value)
        return out

    def _string(self, schema: Mapping[str, Any], depth: int, where: str) -> str:
        low = int(schema.get("minLength", 0))
        high = schema.get("maxLength")
        if high is not None and int(high) < low:
            raise SchemaError(f"{where}: maxLength {high} is below minLength {low}")
        text = self._formatted(schema.get("format"))
        if text is None:
            text = self._phrase(1, 4)
            while len(text) < low:
                text += " " + self._phrase(1, 4)
        if high is not None:
            text = text[: int(high)]
        return text

    def _formatted(self, fmt: Any) -> str | None:
        if fmt not in _FORMATS:
            return None
        r = self.rng
        date = f"{r.randint(2000, 2030):04d}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
        clock = f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}Z"
        made = {
            "date": lambda: date,
            "date-time": lambda: f"{date}T{clock}",
            "time": lambda: clock,
            "email": lambda: f"{self._phrase(1, 1)}@example.com",
            "uri": lambda: f"https://example.com/{self._phrase(1, 1)}",
            "uuid": lambda: str(uuid.UUID(int=r.getrandbits(128), version=4)),
        }
        return made[fmt]()

    def _integer(self, schema: Mapping[str, Any], depth: int, where: str) -> int:
        low, high = _bounds(schema)
        low_i = math.ceil(low) if low is not None else None
        high_i = math.floor(high) if high is not None else None
        if low_i is not None and low is not None and low_i == low and _exclusive(schema, "min"):
            low_i += 1
        if high_i is not None and high is not None and high_i == high and _exclusive(schema, "max"):
            high_i -= 1
        if low_i is None:
            low_i = 0 if high_i is None or high_i >= 0 else high_i - 100
        if high_i is None:
            high_i = low_i + 100
        step = schema.get("multipleOf")
        if isinstance(step, int) and step > 0:
            first, last = math.ceil(low_i / step), math.floor(high_i / step)
            if first > last:
                raise SchemaError(f"{where}: no multiple of {step} in [{low_i}, {high_i}]")
            return self.rng.randint(first, last) * step
        if low_i > high_i:
            raise SchemaError(f"{where}: no integer between the bounds {low} and {high}")
        return self.rng.randint(low_i, high_i)

    def _number(self, schema: Mapping[str, Any], depth: int, where: str) -> float:
        low, high = _bounds(schema)
        low_f = low if low is not None else (0.0 if high is None or high >= 0 else high - 100)
        high_f = high if high is not None else low_f + 100.0
        if low_f > high_f:
            raise SchemaError(f"{where}: no number between the bounds {low} and {high}")
        value = round(self.rng.uniform(low_f, high_f), 2)
        if not low_f <= value <= high_f or value in (low_f, high_f):
            value = (low_f + high_f) / 2
        return value

    def _phrase(self, low: int, high: int) -> str:
        return " ".join(words(self.rng, self.rng.randint(low, high)))


def _bounds(schema: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """Inclusive-looking bounds; exclusiveness is handled by the caller (draft 4 and 6+)."""
    low, high = schema.get("minimum"), schema.get("maximum")
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(ex_low, (int, float)) and not isinstance(ex_low, bool):
        low = ex_low if low is None else max(low, ex_low)
    if isinstance(ex_high, (int, float)) and not isinstance(ex_high, bool):
        high = ex_high if high is None else min(high, ex_high)
    return low, high


def _exclusive(schema: Mapping[str, Any], end: str) -> bool:
    key = "exclusiveMinimum" if end == "min" else "exclusiveMaximum"
    value = schema.get(key)
    return value is True or (isinstance(value, (int, float)) and not isinstance(value, bool))
