"""The prompt templates of docqueue's pipelines, one named constant per mode and pipeline.

Chat mode (an instruction-tuned model through `ChatOpenAI`) gets a short system message and a
user message. Completion mode (the local Gemma 3 270M, a base model, through `/v1/completions`)
gets a few-shot prompt that ends where the model should continue, stop sequences that end its
answer, and a cap on the answer's length.

Placeholders are `{text}` (the chunk), `{labels}` ("a | b") and `{label_list}` ("a, b") for
classify, `{schema}` and `{fields}` for extract. `fill` replaces them in one pass, so braces in
the chunk or in the JSON examples are never read as placeholders. Editing a template changes the
pipeline's version, so results made with the old wording are not reused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Templates:
    """What one pipeline sends: chat messages, the completion prompt, its stop sequences and
    its own cap on the completion's length (None: the job's `llm_max_tokens`)."""

    system: str
    user: str
    completion: str
    stop: tuple[str, ...]
    completion_max_tokens: int | None = None


_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def fill(template: str, values: Mapping[str, str]) -> str:
    """Replace each `{name}` that `values` knows, in one pass; leave all other text as it is."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


# The completion prompts of summarize and classify are the ones measured on Gemma 3 270M in
# examples/local_prompts.md (temperature 0, the twelve texts of workers/local/corpus). A base model
# this small copies far better than it abstracts: asking for a summary "using the text's own
# words" keeps it from inventing facts, and writing keywords before the label lets it pick the
# label from its own keywords. `{text}` is the chunk with its whitespace collapsed.
SUMMARIZE_SYSTEM = (
    "You write short, faithful summaries. Reply with the summary only, in the language of the text."
)
SUMMARIZE_USER = "Summarize this text in one to three sentences.\n\n<text>\n{text}\n</text>"
SUMMARIZE_COMPLETION = """\
Each text is followed by a one-sentence summary of its main point, using the text's own words.

Text: The bakery on Mill Street will close for three weeks in August. The owners plan to replace \
the old oven, which is more than thirty years old, and repaint the shop. Orders for wedding cakes \
will still be delivered from the second shop near the station. The bakery reopens on the first of \
September with a new menu.
Summary: The bakery on Mill Street closes for three weeks in August to replace its oven, but \
wedding cakes will still be delivered.

Text: Researchers tracked forty wild foxes with GPS collars for a whole year. They found that \
foxes living in the city travel much shorter distances each night than foxes in the countryside. \
The scientists think this is because food is much easier to find in cities, where people leave \
rubbish outside.
Summary: Foxes living in the city travel shorter distances each night than country foxes, \
because food is easier to find in cities.

Text: {text}
Summary:"""
# One sentence: ". " ends it (the parser puts the full stop back), and so does a new line.
SUMMARIZE = Templates(
    SUMMARIZE_SYSTEM, SUMMARIZE_USER, SUMMARIZE_COMPLETION, (". ", "\n"), completion_max_tokens=48
)

# The reduce step of summarize: the summaries of consecutive parts of one document (chunks, or
# groups of them), one per line, summarized again. The completion prompt shows them as a list
# of parts (`{text}` is one "- " line per summary): given them as one more text in the map
# prompt, Gemma 3 270M copied the shortest sentence ("The ferry runs all year." for the
# 3,166-word examples/long/ferry-service-review.md); given them as parts, it took the report's
# conclusion. Tried on that one document only.
SUMMARIZE_REDUCE_USER = (
    "These are summaries of consecutive parts of one document, in order. Summarize the whole "
    "document in one to three sentences.\n\n<summaries>\n{text}\n</summaries>"
)
SUMMARIZE_REDUCE_COMPLETION = """\
Each report is given as the summaries of its parts, in order, followed by a one-sentence \
summary of the whole report.

Parts:
- The council reviewed the town's bus service after many complaints about late buses.
- Most passengers said that buses arriving on time mattered more to them than cheaper fares.
- Running the service cost two million euros last year.
- The review recommends buying six new electric buses and adding an early morning route.
Summary: After complaints about late buses, a review of the town's bus service recommends \
buying six new electric buses and adding an early morning route.

Parts:
- Scientists followed bees in three cities for two summers.
- Bees in parks visited more kinds of flowers than bees in private gardens.
- The scientists suggest planting more wild flowers along streets.
Summary: A study of bees in three cities suggests planting more wild flowers along streets, \
because bees in parks visit more kinds of flowers.

Parts:
{text}
Summary:"""
SUMMARIZE_REDUCE = Templates(
    SUMMARIZE_SYSTEM, SUMMARIZE_REDUCE_USER, SUMMARIZE_REDUCE_COMPLETION, (". ", "\n"),
    completion_max_tokens=48,
)

CLASSIFY_SYSTEM = "You classify texts. Choose exactly one label from the list the user gives."
CLASSIFY_USER = "Labels: {labels}\n\nWhich label fits this text best?\n\n<text>\n{text}\n</text>"
CLASSIFY_COMPLETION = """\
Label each text with one topic from this list: {label_list}.

Text: Astronomers measured the light of a distant star and found a planet twice the size of \
Earth orbiting it.
Keywords: astronomers, star, planet
Label: science

Text: The old harbour town is a short ferry ride from the coast, with cheap guesthouses and \
quiet beaches for visitors.
Keywords: harbour town, ferry, guesthouses, beaches
Label: travel

Text: The new phone update adds a battery saving mode and fixes a bug that made the camera app \
crash.
Keywords: phone, update, battery, app
Label: technology

Text: Parliament passed the new tax law after a long debate, and the opposition promised to \
repeal it after the election.
Keywords: parliament, tax law, election
Label: politics

Text: Fry the onions in butter until golden, then add the rice and stir in hot stock one ladle \
at a time.
Keywords: onions, butter, rice, stock
Label: cooking

Text: The striker scored twice in the second half as the home team came back to win the league \
match.
Keywords: striker, team, league match
Label: sports

Text: {text}
Keywords:"""
# The answer is a keywords line, then a "Label:" line; the next "Text:" ends it.
#
# The worked examples stay the same for every label set. When the user's labels are other
# words, the model names a topic in the examples' vocabulary or its own ("finance" for billing
# texts), which the parser refuses: measured on 12 support messages labelled "billing, bug
# report, question", 0 of 12 parsed and none got a wrong label. Variants that list the labels
# in every block or give each example its own label list parsed 11 or 12 of 12 but answered
# "billing" for nearly every text (4 right, 7 or 8 wrong); repeating the instruction with the
# user's labels before the chunk parsed 2 (1 right). Each lost 2 to 5 of 12 on the six topics.
# A confident wrong label is worse than a refused one, so the measured prompt is kept as it is.
CLASSIFY = Templates(
    CLASSIFY_SYSTEM,
    CLASSIFY_USER,
    CLASSIFY_COMPLETION,
    ("\nText:", "\n\n\n"),
    completion_max_tokens=24,
)

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
