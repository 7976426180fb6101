"""The pipelines that ship: what a job asks of the model per chunk, how a document's answers merge.

A pipeline renders a chunk into a `Prompt` (chat messages or a completion prompt), parses the
model's raw text into a JSON-serializable output, and merges one document's chunk outputs, in
chunk order, into the document's output. `workers/provider/client.py` makes the call in between.

| name      | options                   | chunk output          | document output                  |
| --------- | ------------------------- | --------------------- | -------------------------------- |
| summarize | none                      | {"summary": str}      | {"summary": str}                 |
| classify  | labels: [str, str, ...]   | {"label": str}        | {"label", "counts", "share"}     |
| extract   | schema, key: [field, ...] | the object            | {"items": [object, ...]}         |
| custom    | prompt, stop, reduce      | {"text": str}         | {"texts": [...]} or {"text": str}|

How a document's chunk outputs become its one answer (the rule per pipeline):

- summarize: reduced by the model. The chunk summaries, one per line, are summarized again in
  groups that fit the model's context, level after level, until one summary is left
  (workers/jobs/reducing.py).
- custom: with the option `reduce` (a template with {text}), reduced the same way, each group's
  answers joined by blank lines; without it, the list of the chunks' answers.
- extract: merged here. With `key` (fields of the schema), objects with the same key values
  become one, the first value of each field winning; without it, every object, duplicates
  removed.
- classify: merged here. The most frequent label, its count per label and its share of chunks.

Every pipeline answers for a document with failed chunks from the chunks that succeeded (and,
for a reduce, from the steps that succeeded); the document is marked partial and its error
names the failed chunks (workers/jobs/merging.py).

`openai-batch` (workers/pipelines/openai_batch.py) runs the requests of an OpenAI Batch file: one
unchunked document per request, output {"content": str, "finish_reason": str}.
"""

from __future__ import annotations

import json
import re
import textwrap
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
from jsonschema.exceptions import SchemaError, best_match
from referencing.jsonschema import DRAFT202012

from docqueue.workers.errors import PipelineError
from docqueue.workers.pipelines import prompts
from docqueue.workers.pipelines.base import OutputParseError, Pipeline
from docqueue.workers.pipelines.prompts import Templates
from docqueue.workers.tokens import count_tokens


class Summarize(Pipeline):
    name = "summarize"

    def __init__(self, options: Mapping[str, Any]) -> None:
        _check_keys(self.name, options)
        super().__init__({}, prompts.SUMMARIZE, reduce_templates=prompts.SUMMARIZE_REDUCE)

    def parse(self, raw: str, finish_reason: str | None) -> dict[str, str]:
        output: dict[str, str] = super().parse(raw, finish_reason)
        # Completion mode's ". " stop sequence eats the full stop; put it back. A summary cut
        # at max_tokens is kept as it is: it is still a summary, but not a whole sentence.
        if finish_reason != "length" and not _SENTENCE_END.search(output["summary"]):
            output["summary"] += "."
        return output

    def _completion_chunk(self, text: str) -> str:
        # Without an opening Markdown heading the model takes the text's lead sentence; with
        # it, a later one (open-source-maintainers.md in workers/local/corpus).
        return super()._completion_chunk(_drop_heading(text))

    def _completion_parts(self, text: str) -> str:
        # One "- " line per summary, as the reduce prompt's worked examples show them.
        return "\n".join(f"- {' '.join(line.split())}" for line in text.splitlines()
                         if line.strip())

    def _parse(self, raw: str) -> dict[str, str]:
        summary = raw.strip()
        if not summary:
            raise OutputParseError("summarize: the model returned an empty summary")
        return {"summary": summary}

    def reduce_text(self, outputs: Sequence[Any]) -> str:
        # One line per summary: a summary cut at max_tokens does not run into the next one.
        return "\n".join(o["summary"] for o in outputs)

    def merge(self, outputs: Sequence[Any]) -> dict[str, Any]:
        return {"summary": self.reduce_text(outputs)}


class Classify(Pipeline):
    name = "classify"

    def __init__(self, options: Mapping[str, Any]) -> None:
        _check_keys(self.name, options, required=("labels",))
        self.labels = _check_labels(options["labels"])
        self._by_key = {_label_key(label): label for label in self.labels}
        schema = {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": self.labels}},
            "required": ["label"],
            "additionalProperties": False,
        }
        # The measured cap leaves room for a label of 2 tokens; longer labels get theirs too.
        measured = prompts.CLASSIFY.completion_max_tokens or 0
        longest = max(count_tokens(label) for label in self.labels)
        templates = replace(prompts.CLASSIFY, completion_max_tokens=measured + max(0, longest - 2))
        super().__init__(
            {"labels": self.labels},
            templates,
            # Chat mode lists the labels as "a | b"; the measured completion prompt as "a, b".
            values={"labels": " | ".join(self.labels), "label_list": ", ".join(self.labels)},
            response_format=_json_schema_format("classification", schema, strict=True),
            # `{"label": "..."}` plus the label, at most one token per UTF-8 byte.
            chat_max_tokens=16 + max(len(label.encode()) for label in self.labels),
        )

    def _parse(self, raw: str) -> dict[str, str]:
        text = _unfence(raw)
        if text.startswith("{"):  # chat mode's structured output
            answer = _load_json(self.name, text)
            answer = answer.get("label") if isinstance(answer, dict) else None
            if not isinstance(answer, str):
                raise OutputParseError(f'classify: expected {{"label": "..."}}, got {_cut(text)}')
        elif line := _LABEL_LINE.search(text):  # completion mode: keywords, then the label
            answer = line.group(1).strip()
        else:  # a plain answer, from a chat model that ignored the response format
            answer = next((line for line in text.splitlines() if line.strip()), "")
        return {"label": self._match(answer)}

    def _match(self, answer: str) -> str:
        """The label the answer names, ignoring case and punctuation: nothing looser, since
        a small model's near-misses (the whole label list, "positively") are not answers."""
        label = self._by_key.get(_label_key(answer))
        if label is None:
            raise OutputParseError(
                f"classify: the answer {_cut(answer)} is none of the labels {self.labels}"
            )
        return label

    def merge(self, outputs: Sequence[Any]) -> dict[str, Any]:
        """The most frequent label; a tie goes to the label listed first in `labels`."""
        counts = dict.fromkeys(self.labels, 0)
        for output in outputs:
            counts[output["label"]] += 1
        label = max(self.labels, key=counts.__getitem__) if outputs else None
        share = round(counts[label] / len(outputs), 4) if label is not None else None
        return {"label": label, "counts": counts, "share": share}


class Extract(Pipeline):
    name = "extract"

    def __init__(self, options: Mapping[str, Any]) -> None:
        _check_keys(self.name, options, required=("schema",), optional=("key",))
        self._validator = _schema_validator(options["schema"])
        schema: dict[str, Any] = self._validator.schema
        self.key = _check_key_fields(options.get("key", []), schema)
        super().__init__(
            {"schema": schema, "key": self.key} if self.key else {"schema": schema},
            prompts.EXTRACT,
            values={
                "schema": json.dumps(schema, ensure_ascii=False),
                "fields": ", ".join(schema.get("properties", {})) or "any fields",
            },
            response_format=_json_schema_format("extraction", schema, _strict_ready(schema)),
        )

    def _parse(self, raw: str) -> dict[str, Any]:
        data = _load_json(self.name, _unfence(raw))
        error = best_match(self._validator.iter_errors(data))
        if error is not None:
            raise OutputParseError(
                f"extract: the output does not match the schema at {error.json_path}: "
                f"{textwrap.shorten(error.message, 200)}"
            )
        assert isinstance(data, dict)  # the schema's top level is an object schema
        return data

    def merge(self, outputs: Sequence[Any]) -> dict[str, Any]:
        """Objects with equal key fields become one (a field's first non-null value wins);
        without key fields, the objects in chunk order with exact duplicates dropped."""
        merged: dict[str, dict[str, Any]] = {}
        for output in outputs:
            fields = [output.get(k) for k in self.key] if self.key else output
            ident = json.dumps(fields, sort_keys=True, ensure_ascii=False)
            if ident not in merged:
                merged[ident] = dict(output)
            elif self.key:
                kept = merged[ident]
                for name, value in output.items():
                    if kept.get(name) is None:
                        kept[name] = value
        return {"items": list(merged.values())}


class Custom(Pipeline):
    name = "custom"

    def __init__(self, options: Mapping[str, Any]) -> None:
        _check_keys(self.name, options, required=("prompt",), optional=("stop", "reduce"))
        template = _check_template("prompt", options["prompt"])
        stop = _check_stop(options.get("stop", list(prompts.CUSTOM_STOP)))
        templates = Templates(prompts.CUSTOM_SYSTEM, template, template, tuple(stop))
        described: dict[str, Any] = {"prompt": template, "stop": stop}
        reduce_templates = None
        if "reduce" in options:
            described["reduce"] = reduce = _check_template("reduce", options["reduce"])
            reduce_templates = Templates(prompts.CUSTOM_SYSTEM, reduce, reduce, tuple(stop))
        super().__init__(described, templates, reduce_templates=reduce_templates)

    def _completion_chunk(self, text: str) -> str:
        return text.strip()  # the user's own prompt: their chunk goes in as it is

    def _parse(self, raw: str) -> dict[str, str]:
        # Any text is an answer, an empty or cut one too: only the user knows what they asked.
        return {"text": raw.strip()}

    def reduce_text(self, outputs: Sequence[Any]) -> str:
        return "\n\n".join(o["text"] for o in outputs)

    def merge(self, outputs: Sequence[Any]) -> dict[str, Any]:
        if self.reduces:  # the one answer the last reduce step left
            return {"text": self.reduce_text(outputs)}
        # A list, not one joined text: custom answers (lists, JSON, labels) need not concatenate.
        return {"texts": [o["text"] for o in outputs]}


# Option checks. Each message names the pipeline, the option and the problem.


def _check_keys(
    pipeline: str,
    options: Mapping[str, Any],
    required: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
) -> None:
    known = required + optional
    for key in options:
        if key not in known:
            takes = f"known options: {', '.join(known)}" if known else "it takes no options"
            raise PipelineError(f"{pipeline}: unknown option {key!r} ({takes})")
    for key in required:
        if key not in options:
            raise PipelineError(f"{pipeline}: option {key!r} is required")


def _label_key(text: str) -> str:
    """A label as the parser compares it: case-folded, punctuation dropped, spaces collapsed."""
    kept = "".join(c for c in text.casefold() if not unicodedata.category(c).startswith("P"))
    return " ".join(kept.split())


def _check_labels(labels: Any) -> list[str]:
    if not isinstance(labels, list | tuple) or len(labels) < 2:
        raise PipelineError(
            f"classify: option 'labels' must be a list of at least 2 labels, got {_cut(labels)}"
        )
    seen: dict[str, str] = {}
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise PipelineError(f"classify: each label must be a non-empty string, got {label!r}")
        key = _label_key(label)
        if len(label.strip().splitlines()) > 1 or not key:
            raise PipelineError(
                f"classify: label {label!r} must be one line with a letter or digit in it"
            )
        if key in seen:
            raise PipelineError(
                f"classify: labels {seen[key]!r} and {label!r} are the same label "
                "once case and punctuation are ignored"
            )
        seen[key] = label
    return [label.strip() for label in labels]


def _schema_validator(schema: Any) -> Any:
    """A validator for a plain-JSON copy of a valid object schema whose `$ref`s resolve within."""
    if not isinstance(schema, Mapping):
        raise PipelineError(
            f"extract: option 'schema' must be a JSON schema object, got {_cut(schema)}"
        )
    try:  # a plain JSON copy: no tuples or NaN, and the caller's later edits do not leak in
        plain: dict[str, Any] = json.loads(json.dumps(schema, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"extract: option 'schema' is not plain JSON: {exc}") from exc
    draft = jsonschema.validators.validator_for(plain, default=jsonschema.Draft202012Validator)
    try:
        draft.check_schema(plain)
    except SchemaError as exc:
        raise PipelineError(
            f"extract: option 'schema' is not a valid JSON schema: {exc.message} "
            f"(at {exc.json_path})"
        ) from exc
    if plain.get("type") != "object":
        raise PipelineError(
            "extract: option 'schema' must describe an object at its top level ({\"type\": "
            f'"object", "properties": {{...}}}}), got "type": {json.dumps(plain.get("type"))}'
        )
    root = referencing.Registry().resolver_with_root(
        referencing.Resource.from_contents(plain, default_specification=DRAFT202012)
    )
    for ref in _refs(plain):
        try:
            root.lookup(ref)
        except referencing.exceptions.Unresolvable:
            raise PipelineError(
                f"extract: option 'schema' has a $ref {ref!r} that does not point inside the "
                "schema (only references within it, such as '#/$defs/name', are followed)"
            ) from None
    # An empty registry: a `$ref` to a URL must never make a worker fetch it.
    return draft(plain, registry=referencing.Registry())


def _refs(node: Any) -> Iterator[str]:
    """Every `$ref` string in a schema, depth first."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _check_template(option: str, template: Any) -> str:
    if not isinstance(template, str) or "{text}" not in template:
        raise PipelineError(
            f"custom: option {option!r} must be a string containing the placeholder {{text}} "
            "(single braces), which marks where the text goes; other braces stay as written"
        )
    return template


def _check_key_fields(key: Any, schema: dict[str, Any]) -> list[str]:
    properties = schema.get("properties", {})
    if not isinstance(key, list | tuple) or not all(isinstance(k, str) for k in key):
        raise PipelineError(f"extract: option 'key' must be a list of field names, got {_cut(key)}")
    for name in key:
        if name not in properties:
            raise PipelineError(
                f"extract: key field {name!r} is not a property of the schema "
                f"(properties: {', '.join(properties) or 'none'})"
            )
    return list(key)


def _check_stop(stop: Any) -> list[str]:
    # OpenAI-compatible servers take at most 4 stop sequences.
    if not isinstance(stop, list | tuple) or len(stop) > 4:
        raise PipelineError(
            f"custom: option 'stop' must be a list of up to 4 strings, got {stop!r}"
        )
    for s in stop:
        if not isinstance(s, str) or not s:
            raise PipelineError(f"custom: each stop sequence must be a non-empty string, got {s!r}")
    return list(stop)


# Output helpers.


def _json_schema_format(name: str, schema: dict[str, Any], strict: bool) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": schema, "strict": strict},
    }


# Checks that some models' strict mode rejects; the validation here still applies them.
# fmt: off
_NOT_STRICT_KEYWORDS = frozenset({
    "pattern", "format", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "minItems", "maxItems", "uniqueItems", "minProperties",
    "maxProperties", "patternProperties",
})
# fmt: on


def _strict_ready(node: Any) -> bool:
    """Whether OpenAI's strict mode takes the schema: every object closed with every property
    required, and no constraint keyword. Strict mode answers other schemas with a 400; without
    it the schema still guides the model, and the output is validated here all the same."""
    if isinstance(node, list):
        return all(_strict_ready(item) for item in node)
    if not isinstance(node, dict):
        return True
    if not _NOT_STRICT_KEYWORDS.isdisjoint(node):
        return False
    if node.get("type") == "object" or "properties" in node:
        properties = node.get("properties", {})
        closed = node.get("additionalProperties") is False
        if not closed or set(node.get("required", ())) != set(properties):
            return False
    return all(_strict_ready(value) for value in node.values())


# A Markdown (ATX) heading line that opens a chunk, with the blank lines after it.
_HEADING = re.compile(r"\A\s*#{1,6}[ \t][^\n]*\n\s*(?=\S)")
# A sentence's end: . ! ? or an ellipsis, maybe followed by closing quotes and brackets.
_SENTENCE_END = re.compile(r"[.!?\u2026][\"'\u2019\u201d)\]]*$")
# The first "Label: ..." line of a completion-mode answer, which may follow a blank line.
_LABEL_LINE = re.compile(r"^[ \t]*Label[ \t]*:(.*)$", re.IGNORECASE | re.MULTILINE)

_FENCED = re.compile(r"```[\w-]*\s*(.*?)\s*(?:```)?", re.DOTALL)


def _drop_heading(text: str) -> str:
    """The chunk without a Markdown heading line at its start (a lone heading is kept)."""
    return _HEADING.sub("", text, count=1)


def _unfence(raw: str) -> str:
    """The output without surrounding whitespace and Markdown code fence (closed or cut off)."""
    text = raw.strip()
    fenced = _FENCED.fullmatch(text)
    return fenced.group(1) if fenced else text


def _load_json(pipeline: str, text: str) -> Any:
    """The first JSON value in `text`; text after it (a small model's chatter) is ignored."""
    if not text:
        raise OutputParseError(f"{pipeline}: the model returned no output")
    try:
        return json.JSONDecoder().raw_decode(text)[0]
    except json.JSONDecodeError as exc:
        raise OutputParseError(
            f"{pipeline}: the output is not valid JSON ({exc.msg} at line {exc.lineno} "
            f"column {exc.colno}): {_cut(text)}"
        ) from exc


def _cut(value: Any) -> str:
    """A repr short enough for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
