"""The prompt templates of docqueue's pipelines, one named constant per mode and pipeline.

Chat mode (an instruction-tuned model through `ChatOpenAI`) gets a short system message and a
user message. Completion mode (the local Gemma 3 270M, a base model, through `/v1/completions`)
gets a few-shot prompt that ends where the model should continue, and stop sequences that end
its answer after one line.

Placeholders are `{text}` (the chunk), `{labels}` (classify), `{schema}` and `{fields}`
(extract). `fill` replaces them in one pass, so braces in the chunk or in the JSON examples are
never read as placeholders. Editing a template changes the pipeline's version, so results made with the old
wording are not reused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Templates:
    """What one pipeline sends: chat messages, the completion prompt and its stop sequences."""

    system: str
    user: str
    completion: str
    stop: tuple[str, ...]


_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def fill(template: str, values: Mapping[str, str]) -> str:
    """Replace each `{name}` that `values` knows, in one pass; leave all other text as it is."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


# The completion prompts were chosen by trying variants on Gemma 3 270M (temperature 0, 8 short
# and 3 long texts). With "Summary:" examples it copied the text, or an example's summary, as
# the summary of a long chunk; the headline framing gave short lines and copied no example.
SUMMARIZE_SYSTEM = (
    "You write short, faithful summaries. Reply with the summary only, in the language of the text."
)
SUMMARIZE_USER = "Summarize this text in one to three sentences.\n\n<text>\n{text}\n</text>"
SUMMARIZE_COMPLETION = """\
Article: The city council voted on Tuesday to extend the tram line to the airport. Work begins \
next spring and should take two years, and the council expects about 20,000 riders a day.
Headline: Council approves a two-year tram extension to the airport, starting next spring

Article: The new laptop's battery lasted eleven hours in our tests, three more than last year's \
model, but it takes twice as long to charge.
Headline: New laptop's battery lasts three hours longer but charges twice as slowly

Article: {text}
Headline:"""
SUMMARIZE = Templates(SUMMARIZE_SYSTEM, SUMMARIZE_USER, SUMMARIZE_COMPLETION, ("\n",))

# The examples use labels of their own: they teach the format, the user's labels come last.
# `{labels}` is the user's labels joined by " | ", which told them apart best; on long chunks the
# model still often echoes the whole list, which the parser refuses rather than guess a label.
CLASSIFY_SYSTEM = "You classify texts. Choose exactly one label from the list the user gives."
CLASSIFY_USER = "Labels: {labels}\n\nWhich label fits this text best?\n\n<text>\n{text}\n</text>"
CLASSIFY_COMPLETION = """\
Labels: sports | politics | science
Text: The striker scored twice in the second half and the home side won 3-1.
Label: sports

Labels: positive | negative
Text: The soup was cold and the waiter ignored us all evening.
Label: negative

Labels: invoice | complaint | question
Text: Could you tell me when the shop opens on Sundays?
Label: question

Labels: {labels}
Text: {text}
Label:"""
CLASSIFY = Templates(CLASSIFY_SYSTEM, CLASSIFY_USER, CLASSIFY_COMPLETION, ("\n",))

# Chat mode shows the whole JSON schema (`{schema}`). The base model copied a JSON schema's
# structure instead of filling it in, so completion mode names only the top-level properties
# (`{fields}`); the parser still validates against the whole schema.
EXTRACT_SYSTEM = (
    "You extract data from texts. Reply with one JSON object that matches the schema, "
    "holding only what the text says."
)
EXTRACT_USER = (
    "Extract the data described by this JSON schema:\n{schema}\n\n<text>\n{text}\n</text>"
)
EXTRACT_COMPLETION = """\
Text: Ada Lovelace published her notes on the Analytical Engine in 1843.
JSON with name, year: {"name": "Ada Lovelace", "year": 1843}

Text: Lisbon reached 31.5 degrees Celsius on Monday afternoon.
JSON with city, temp_c: {"city": "Lisbon", "temp_c": 31.5}

Text: {text}
JSON with {fields}:"""
EXTRACT = Templates(EXTRACT_SYSTEM, EXTRACT_USER, EXTRACT_COMPLETION, ("\n",))

# custom: the user's template is both the chat user message and the completion prompt.
CUSTOM_SYSTEM = "Follow the instructions in the user's message. Reply with the answer only."
CUSTOM_STOP: tuple[str, ...] = ("\n\n",)
