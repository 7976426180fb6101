"""The four prompt pipelines: prompts in both modes, versions, parsing, merging, option errors.

`openai-batch`, which sends requests it is given rather than prompts, has its own tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from docqueue.workers.errors import PipelineError, RetryableLLMError
from docqueue.workers.pipelines import (
    PIPELINE_NAMES,
    OutputParseError,
    Pipeline,
    build_pipeline,
    prompts,
)

ROOT = Path(__file__).resolve().parents[2]
PROMPT_PIPELINES = ("summarize", "classify", "extract", "custom")
LABELS = ["positive", "negative", "neutral"]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "year": {"type": "integer"}},
    "required": ["name"],
}
OPTIONS: dict[str, dict[str, Any]] = {
    "summarize": {},
    "classify": {"labels": LABELS},
    "extract": {"schema": SCHEMA},
    "custom": {"prompt": "List the people named in this text.\n\nText: {text}\nPeople:"},
}
# A chunk full of things a template engine would trip over.
NASTY_CHUNK = 'He wrote {text}, {labels} and {schema} and {0} and {{x}} and "}" here.'


def pipeline(name: str) -> Pipeline:
    return build_pipeline(name, OPTIONS[name])


def test_the_table_holds_the_four_prompt_pipelines() -> None:
    # Given the module / When the names are listed / Then the four come first, in order
    assert PIPELINE_NAMES[:4] == PROMPT_PIPELINES


# Rendering.


@pytest.mark.parametrize("name", PROMPT_PIPELINES)
def test_chat_mode_sends_a_system_and_a_user_message_with_the_chunk(name: str) -> None:
    # Given a pipeline / When a chunk is rendered for a chat model
    prompt = pipeline(name).render("  The cat sat on the mat.\n", "chat")

    # Then there is a system message, then the user message with the chunk, and no completion text
    assert prompt.text is None
    assert prompt.messages is not None
    assert [m["role"] for m in prompt.messages] == ["system", "user"]
    assert "The cat sat on the mat." in prompt.messages[1]["content"]
    assert prompt.stop is None


@pytest.mark.parametrize(
    ("name", "ending", "stop", "max_tokens"),
    [
        # one sentence: the parser puts back the full stop that ". " eats
        ("summarize", "\n\nText: The cat sat on the mat.\nSummary:", [". ", "\n"], 48),
        # keywords first, then a "Label:" line; the next worked example's "Text:" ends it
        ("classify", "\n\nText: The cat sat on the mat.\nKeywords:", ["\nText:", "\n\n\n"], 24),
        ("extract", "\n\nText: The cat sat on the mat.\nJSON with name, year:", ["\n"], None),
        ("custom", "\n\nText: The cat sat on the mat.\nPeople:", ["\n\n"], None),
    ],
)
def test_completion_mode_ends_where_the_base_model_should_continue(
    name: str, ending: str, stop: list[str], max_tokens: int | None
) -> None:
    # Given a pipeline / When a chunk is rendered for a base model
    prompt = pipeline(name).render("The cat sat on the mat.\n\n", "completion")

    # Then it is one text ending at the answer's slot, with the stops and cap that end the answer
    assert prompt.messages is None and prompt.response_format is None
    assert prompt.text is not None and prompt.text.endswith(ending)
    assert (prompt.stop, prompt.max_tokens) == (stop, max_tokens)


def _measured_templates() -> list[str]:
    """The two templates of examples/local_prompts.md, as written there."""
    doc = (ROOT / "examples" / "local_prompts.md").read_text()
    return re.findall(r"```text\n(.*?)\n```", doc, flags=re.DOTALL)


def test_summarize_and_classify_use_the_prompts_measured_on_the_local_model() -> None:
    # Given the two prompts measured on Gemma 3 270M, with their labels as "a, b, c"
    summary, label = _measured_templates()
    labels = ["sports", "politics", "technology", "cooking", "science", "travel"]
    chunk = "The striker scored twice."

    # When summarize and classify render a chunk for a base model
    summarize = build_pipeline("summarize", {}).render(chunk, "completion").text
    classify = build_pipeline("classify", {"labels": labels}).render(chunk, "completion").text

    # Then the prompts are those, word for word
    assert summarize == summary.replace("{text}", chunk)
    assert classify == label.replace("{labels}", ", ".join(labels)).replace("{text}", chunk)


def test_completion_mode_sends_the_chunk_on_one_line() -> None:
    # Given a chunk over several lines with runs of spaces
    chunk = "  The cat sat\n\non the   mat.\tIt purred.\n"

    # When rendered for a base model / Then its whitespace is collapsed (as the prompts measured)
    for name in ("summarize", "classify", "extract"):
        text = pipeline(name).render(chunk, "completion").text
        assert text is not None and "Text: The cat sat on the mat. It purred.\n" in text
    # And custom, whose prompt is the user's own, gets the chunk as it is, trimmed
    custom = pipeline("custom").render(chunk, "completion").text
    assert (
        custom is not None and "Text: The cat sat\n\non the   mat.\tIt purred.\nPeople:" in custom
    )


def test_summarize_leaves_out_an_opening_markdown_heading_in_completion_mode() -> None:
    # Given the first chunk of a Markdown document, and a chunk that is only a heading
    doc = "# Who maintains the software?\n\nMuch of the software depends on volunteers.\n"

    # When summarize renders them for a base model
    def rendered(chunk: str, mode: Any = "completion") -> str:
        prompt = pipeline("summarize").render(chunk, mode)
        return prompt.text if mode == "completion" else prompt.messages[1]["content"]  # type: ignore[index,return-value]

    # Then the heading is left out (the model then summarizes the text, not its title)
    assert rendered(doc).endswith("\nText: Much of the software depends on volunteers.\nSummary:")
    # But a heading that is the whole chunk, or a "#" that opens ordinary text, stays
    assert rendered("## Contents").endswith("\nText: ## Contents\nSummary:")
    assert rendered("#1 on the list.").endswith("\nText: #1 on the list.\nSummary:")
    # And chat mode, and classify, keep the heading
    assert "# Who maintains the software?\n\nMuch" in rendered(doc, "chat")
    classify = pipeline("classify").render(doc, "completion").text
    assert classify is not None and "Text: # Who maintains the software? Much of" in classify


@pytest.mark.parametrize("name", ["summarize", "classify", "extract"])
def test_completion_prompts_are_few_shot(name: str) -> None:
    # Given a built-in pipeline / When it renders for a base model
    text = pipeline(name).render("Some chunk.", "completion").text
    assert text is not None

    # Then worked examples precede the chunk, each a block of its own
    marker = {"summarize": "Summary:", "classify": "Label:", "extract": "JSON with"}[name]
    assert text.count(marker) >= 3
    assert text.count("\n\n") >= 2


@pytest.mark.parametrize("name", PROMPT_PIPELINES)
@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_braces_in_the_chunk_are_inserted_verbatim(name: str, mode: Any) -> None:
    # Given a chunk holding placeholders and stray braces
    # When it is rendered
    prompt = pipeline(name).render(NASTY_CHUNK, mode)

    # Then the chunk appears as written, exactly once, and nothing in it was substituted
    text = prompt.text if mode == "completion" else prompt.messages[1]["content"]  # type: ignore[index]
    assert text is not None and text.count(NASTY_CHUNK) == 1


def test_classify_chat_mode_asks_for_one_of_the_labels_by_schema() -> None:
    # Given classify with three labels / When rendered for a chat model
    prompt = pipeline("classify").render("Great!", "chat")

    # Then structured output restricts the answer to the labels, in strict mode
    assert prompt.response_format == {
        "type": "json_schema",
        "json_schema": {
            "name": "classification",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": LABELS}},
                "required": ["label"],
                "additionalProperties": False,
            },
        },
    }
    assert prompt.messages is not None
    assert "positive | negative | neutral" in prompt.messages[1]["content"]


def test_classify_caps_the_answer_length_in_both_modes() -> None:
    # Given classify with short labels, and with a long one
    short = build_pipeline("classify", {"labels": ["billing", "bug report", "question"]})
    long = build_pipeline("classify", {"labels": ["yes", "a much longer label than usual"]})

    # When rendered in each mode
    def cap(classify: Pipeline, mode: Any) -> int | None:
        return classify.render("x", mode).max_tokens

    # Then chat mode leaves room for the longest label and the JSON around it, and no more
    assert cap(short, "chat") == 16 + len("bug report")
    assert cap(long, "chat") == 16 + len("a much longer label than usual")
    # And completion mode has the measured 24 for keywords and a short label, more for a long one
    assert cap(short, "completion") == 24
    assert cap(long, "completion") == 24 + 4  # 6 tokens, 2 of them inside the measured cap
    assert pipeline("summarize").render("x", "chat").max_tokens is None


@pytest.mark.parametrize(
    ("schema", "strict"),
    [
        (SCHEMA, False),  # "year" is optional and extra keys are allowed
        ({**SCHEMA, "required": ["name", "year"], "additionalProperties": False}, True),
        (
            {
                "type": "object",
                "properties": {"when": {"type": "string", "format": "date"}},
                "required": ["when"],
                "additionalProperties": False,
            },
            False,  # "format" is a check some models' strict mode rejects
        ),
    ],
)
def test_extract_asks_for_strict_mode_only_for_schemas_it_accepts(
    schema: dict[str, Any], strict: bool
) -> None:
    # Given an extract schema / When rendered for a chat model
    prompt = build_pipeline("extract", {"schema": schema}).render("x", "chat")

    # Then the schema is sent as structured output, strict only where strict mode takes it
    assert prompt.messages is not None and json.dumps(schema) in prompt.messages[1]["content"]
    assert prompt.response_format is not None
    assert prompt.response_format["json_schema"]["schema"] == schema
    assert prompt.response_format["json_schema"]["strict"] is strict


def test_extract_completion_mode_names_the_top_level_fields() -> None:
    # Given a nested schema, and one with no properties
    nested = {"type": "object", "properties": {"who": {"type": "object"}, "when": {}}}
    free = {"type": "object"}

    # When rendered for a base model
    def rendered(schema: dict[str, Any]) -> str:
        text = build_pipeline("extract", {"schema": schema}).render("x", "completion").text
        assert text is not None
        return text

    # Then the prompt asks for the top-level keys, not the whole schema
    assert rendered(nested).endswith("Text: x\nJSON with who, when:")
    assert rendered(free).endswith("Text: x\nJSON with any fields:")


def test_custom_substitutes_only_text_and_keeps_other_braces() -> None:
    # Given a custom template with JSON and other placeholders in it
    template = 'Answer as {"names": [...]}; ignore {labels} and {{x}}.\n{text}\n'
    custom = build_pipeline("custom", {"prompt": template})

    # When rendered
    prompt = custom.render("Ada met Charles.", "completion")

    # Then only {text} was replaced
    assert (
        prompt.text == 'Answer as {"names": [...]}; ignore {labels} and {{x}}.\nAda met Charles.\n'
    )
    assert prompt.stop == ["\n\n"]


def test_custom_stop_option_sets_or_clears_the_stop_sequences() -> None:
    # Given custom with its own stop sequences, and with none
    own = build_pipeline("custom", {"prompt": "{text}", "stop": ["###"]})
    none = build_pipeline("custom", {"prompt": "{text}", "stop": []})

    # When rendered for a base model / Then they are used as given
    assert own.render("x", "completion").stop == ["###"]
    assert none.render("x", "completion").stop is None


def test_an_unknown_mode_is_refused() -> None:
    # Given a pipeline / When asked for a mode that does not exist / Then it says so
    with pytest.raises(ValueError, match="mode must be 'chat' or 'completion', got 'edit'"):
        pipeline("summarize").render("x", "edit")  # type: ignore[arg-type]


# Versions.


def _versions_in_a_fresh_interpreter() -> dict[str, str]:
    code = (
        "import json, sys\n"
        "from docqueue.workers.pipelines import build_pipeline\n"
        "options = json.loads(sys.argv[1])\n"
        "print(json.dumps({n: build_pipeline(n, o).version for n, o in options.items()}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    run = subprocess.run(
        [sys.executable, "-c", code, json.dumps(OPTIONS)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    return dict(json.loads(run.stdout))


def test_versions_are_the_same_in_every_process() -> None:
    # Given the same options / When versions are computed here and in another interpreter
    here = {name: pipeline(name).version for name in PROMPT_PIPELINES}

    # Then they agree, name the pipeline, and fit the results table's column
    assert _versions_in_a_fresh_interpreter() == here
    for name, version in here.items():
        assert version.startswith(f"{name}-r1-") and len(version) <= 64


@pytest.mark.parametrize("name", PROMPT_PIPELINES)
def test_described_options_build_the_same_pipeline(name: str) -> None:
    # Given a pipeline / When it is rebuilt from the options stored on the job row
    first = pipeline(name)
    stored = json.loads(json.dumps(first.describe()))
    again = build_pipeline(name, stored)

    # Then it is the same version
    assert again.version == first.version


@pytest.mark.parametrize(
    ("name", "other"),
    [
        ("classify", {"labels": ["positive", "negative"]}),
        ("classify", {"labels": ["negative", "positive", "neutral"]}),  # order breaks ties
        ("extract", {"schema": {**SCHEMA, "required": ["year"]}}),
        ("custom", {"prompt": "Who is named here?\n{text}\nPeople:"}),
        ("custom", {**OPTIONS["custom"], "stop": ["\n"]}),
    ],
)
def test_the_version_changes_with_the_options(name: str, other: dict[str, Any]) -> None:
    # Given two option sets that render different prompts / When built / Then versions differ
    assert build_pipeline(name, other).version != pipeline(name).version


def test_the_version_changes_when_a_template_is_edited(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given summarize's version / When someone tunes its completion template
    before = pipeline("summarize").version
    tuned = dataclasses.replace(prompts.SUMMARIZE, completion="Text: {text}\nTL;DR:")
    monkeypatch.setattr(prompts, "SUMMARIZE", tuned)

    # Then results made with the old wording are no longer matched
    assert pipeline("summarize").version != before


def test_options_are_copied_so_later_edits_do_not_leak_in() -> None:
    # Given extract built from a schema the caller then changes
    schema = json.loads(json.dumps(SCHEMA))
    extract = build_pipeline("extract", {"schema": schema})
    version = extract.version
    schema["properties"]["year"]["type"] = "string"

    # When the pipeline is used / Then it still has the schema it was built with
    assert extract.version == version
    assert extract.describe() == {"schema": SCHEMA}
    assert extract.parse('{"name": "Ada", "year": 1843}', "stop") == {"name": "Ada", "year": 1843}


# Parsing.


def test_outputs_that_cannot_be_used_are_retryable() -> None:
    # A new sample may parse, so the caller retries (within its attempt cap).
    assert issubclass(OutputParseError, RetryableLLMError)


def test_summarize_keeps_the_text_even_when_cut_off() -> None:
    summarize = pipeline("summarize")
    # Given a whole summary and one cut at max_tokens / When parsed / Then both are kept
    assert summarize.parse(" Cats sit.\n", "stop") == {"summary": "Cats sit."}
    assert summarize.parse(" Cats sit on", "length") == {"summary": "Cats sit on"}


@pytest.mark.parametrize(
    ("raw", "summary"),
    [
        # the ". " stop sequence ate the full stop
        (
            " The bakery closes for three weeks in August",
            "The bakery closes for three weeks in August.",
        ),
        ("Is the bakery closing?", "Is the bakery closing?"),
        ("It closes!", "It closes!"),
        ('She said "it closes."', 'She said "it closes."'),
        ("It closes (for now.)", "It closes (for now.)"),
        ("It closes (for now)", "It closes (for now)."),
        ("Two sentences. Chat models write them.", "Two sentences. Chat models write them."),
    ],
)
def test_summarize_ends_a_finished_summary_with_a_full_stop(raw: str, summary: str) -> None:
    # Given a summary the model finished / When parsed / Then it ends as a sentence, once
    assert pipeline("summarize").parse(raw, "stop") == {"summary": summary}


def test_summarize_refuses_an_empty_summary() -> None:
    # Given blank output / When parsed / Then it is a parse error (a new sample may do better)
    with pytest.raises(OutputParseError, match="summarize: the model returned an empty summary"):
        pipeline("summarize").parse(" \n ", "stop")


@pytest.mark.parametrize(
    ("raw", "label"),
    [
        (" negative", "negative"),
        ("Negative.\nNeutral.", "negative"),  # a plain answer: the first line counts
        ("\n  NEUTRAL!  \n", "neutral"),
        # completion mode: keywords, then the first "Label:" line, maybe after a blank line
        (" soup, cold, waiter\nLabel: negative\n", "negative"),
        (" sleep, brain, study\n\nlabel:  Neutral.\n", "neutral"),
        (" cake\nLabel: positive\nLabel: negative", "positive"),
        ('{"label": "neutral"}', "neutral"),  # chat mode's structured output
        ('```json\n{"label": "positive"}\n```', "positive"),
    ],
)
def test_classify_maps_the_answer_to_a_label(raw: str, label: str) -> None:
    # Given an answer / When parsed / Then it names the label as the user spelled it
    assert pipeline("classify").parse(raw, "stop") == {"label": label}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("positively", "the answer 'positively' is none of the labels"),
        ("Positive, clearly.", "the answer 'Positive, clearly.' is none of the labels"),
        # a small model echoing the list: no label is chosen, so none may be guessed
        ("positive | negative | neutral", "is none of the labels"),
        ("", "the answer '' is none of the labels"),
        ('{"label": "angry"}', "the answer 'angry' is none of the labels"),
        ('{"mood": "positive"}', 'expected {"label": "..."}'),
        ('{"label": "pos', "not valid JSON"),
        # a topic of the worked examples, not one of the user's labels
        (" invoice, credit\nLabel: finance\n", "the answer 'finance' is none of the labels"),
        # keywords with no label line
        (" soup, vegetables, stock\n", "the answer 'soup, vegetables, stock' is none of"),
    ],
)
def test_classify_refuses_answers_that_are_no_label(raw: str, message: str) -> None:
    # Given an answer that names no label / When parsed / Then the error says why
    with pytest.raises(OutputParseError, match=r"^classify: ") as caught:
        pipeline("classify").parse(raw, "stop")
    assert message in str(caught.value)


def test_a_cut_off_label_says_it_was_cut_off() -> None:
    # Given structured output cut at max_tokens / When parsed / Then the error names the cause
    with pytest.raises(OutputParseError, match=r"cut off at max_tokens"):
        pipeline("classify").parse('{"label": "neg', "length")


@pytest.mark.parametrize(
    "raw",
    [
        '{"name": "Ada Lovelace", "year": 1843}',
        '  \n{"name": "Ada Lovelace", "year": 1843}\n',
        '```json\n{"name": "Ada Lovelace", "year": 1843}\n```',
        '```\n{"name": "Ada Lovelace", "year": 1843}',  # a fence the model never closed
        '{"name": "Ada Lovelace", "year": 1843}\nText: more chatter',
    ],
)
def test_extract_reads_the_json_object(raw: str) -> None:
    # Given JSON output, bare, fenced or followed by chatter / When parsed / Then it is the object
    assert pipeline("extract").parse(raw, "stop") == {"name": "Ada Lovelace", "year": 1843}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"name": "Ada", "year": "1843"}', "at $.year: '1843' is not of type 'integer'"),
        ('{"year": 1843}', "at $: 'name' is a required property"),
        ('["Ada"]', "at $: ['Ada'] is not of type 'object'"),
        ('{"name": "Ada" "year": 1843}', "not valid JSON (Expecting ',' delimiter at line 1"),
        ("Ada Lovelace, 1843", "not valid JSON"),
        ("```json\n```", "the model returned no output"),
    ],
)
def test_extract_names_the_problem_with_bad_output(raw: str, message: str) -> None:
    # Given output that is not JSON, or JSON that breaks the schema
    # When parsed / Then the error names the place and the problem
    with pytest.raises(OutputParseError, match=r"^extract: ") as caught:
        pipeline("extract").parse(raw, "stop")
    assert message in str(caught.value)


def test_extract_cut_off_json_is_a_parse_error_that_says_so() -> None:
    # Given JSON cut at max_tokens / When parsed / Then it cannot be used, and the error says why
    with pytest.raises(OutputParseError, match=r"not valid JSON.*cut off at max_tokens"):
        pipeline("extract").parse('{"name": "Ada Lo', "length")


def test_extract_keeps_cut_off_output_that_still_parses() -> None:
    # Given output that is complete although the server reported "length" / Then it is kept
    assert pipeline("extract").parse('{"name": "Ada"}', "length") == {"name": "Ada"}


def test_custom_keeps_any_text() -> None:
    custom = pipeline("custom")
    # Given answers whole, cut off and empty / When parsed / Then they are kept as text
    assert custom.parse(" Ada, Charles\n", "stop") == {"text": "Ada, Charles"}
    assert custom.parse("Ada, Char", "length") == {"text": "Ada, Char"}
    assert custom.parse("", "stop") == {"text": ""}


# Merging.


def test_summarize_merge_joins_the_summaries_in_order() -> None:
    summarize = pipeline("summarize")
    # Given chunk summaries in chunk order (a job without a reduce step) / When merged / Then
    # one text, one line per chunk
    outputs = [{"summary": "First part."}, {"summary": "Second part."}]
    assert summarize.merge(outputs) == {"summary": "First part.\nSecond part."}
    assert summarize.merge([]) == {"summary": ""}


def test_classify_merge_takes_the_majority_with_the_counts() -> None:
    # Given labels of three chunks / When merged / Then the majority wins, with every count
    merged = pipeline("classify").merge(
        [{"label": "negative"}, {"label": "positive"}, {"label": "negative"}]
    )
    assert merged == {"label": "negative", "counts": {"positive": 1, "negative": 2, "neutral": 0},
                      "share": 0.6667}


def test_classify_merge_breaks_a_tie_by_the_users_label_order() -> None:
    # Given a tie between neutral and negative / When merged
    outputs = [{"label": "neutral"}, {"label": "negative"}]
    # Then the label listed first in `labels` wins, whatever the chunk order
    assert pipeline("classify").merge(outputs)["label"] == "negative"
    reordered = build_pipeline("classify", {"labels": ["neutral", "negative", "positive"]})
    assert reordered.merge(outputs[::-1])["label"] == "neutral"


def test_classify_merge_of_no_chunks_has_no_label() -> None:
    # Given no successful chunk / When merged / Then there is no label and every count is 0
    merged = pipeline("classify").merge([])
    assert merged == {"label": None, "counts": {"positive": 0, "negative": 0, "neutral": 0},
                      "share": None}


def test_extract_and_custom_merge_keep_every_chunk_in_order() -> None:
    # Given per-chunk outputs / When merged / Then all are listed in chunk order
    items = [{"name": "Ada"}, {"name": "Charles", "year": 1834}]
    assert pipeline("extract").merge(items) == {"items": items}
    assert pipeline("extract").merge([]) == {"items": []}
    texts = [{"text": "Ada"}, {"text": ""}, {"text": "Charles"}]
    assert pipeline("custom").merge(texts) == {"texts": ["Ada", "", "Charles"]}


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("summarize", "A summary."),
        ("classify", "positive"),
        ("extract", '{"name": "Ada"}'),
        ("custom", "Ada"),
    ],
)
def test_outputs_survive_a_json_round_trip(name: str, raw: str) -> None:
    # Given a parsed chunk and a merged document / When stored as JSON / Then nothing changes
    p = pipeline(name)
    output = p.parse(raw, "stop")
    merged = p.merge([output, output])
    assert json.loads(json.dumps([output, merged])) == [output, merged]


# Option errors: each names the pipeline, the option and the problem.

BAD_OPTIONS = [
    ("translate", {}, "unknown pipeline 'translate'; known: summarize, classify, extract, custom"),
    ("summarize", ["x"], "summarize: options must be a JSON object, got list"),
    ("summarize", {"length": 3}, "summarize: unknown option 'length' (it takes no options)"),
    ("classify", {}, "classify: option 'labels' is required"),
    (
        "classify",
        {"labels": LABELS, "multi": True},
        "classify: unknown option 'multi' (known options: labels)",
    ),
    ("classify", {"labels": "yes,no"}, "classify: option 'labels' must be a list of at least 2"),
    ("classify", {"labels": ["yes"]}, "classify: option 'labels' must be a list of at least 2"),
    ("classify", {"labels": ["yes", 2]}, "classify: each label must be a non-empty string, got 2"),
    ("classify", {"labels": ["yes", " "]}, "classify: each label must be a non-empty string"),
    ("classify", {"labels": ["yes", "?!"]}, "classify: label '?!' must be one line with a letter"),
    ("classify", {"labels": ["yes", "a\nb"]}, "classify: label 'a\\nb' must be one line"),
    (
        "classify",
        {"labels": ["Spam", "ham", "spam!"]},
        "classify: labels 'Spam' and 'spam!' are the same label once case and punctuation",
    ),
    ("classify", {"labels": ["a", "a"]}, "classify: labels 'a' and 'a' are the same label"),
    ("extract", {}, "extract: option 'schema' is required"),
    ("extract", {"schema": "object"}, "extract: option 'schema' must be a JSON schema object"),
    (
        "extract",
        {"schema": {"type": "objekt"}},
        "extract: option 'schema' is not a valid JSON schema: 'objekt' is not valid",
    ),
    (
        "extract",
        {"schema": {"type": "object", "properties": {"a": {"minimum": "0"}}}},
        "extract: option 'schema' is not a valid JSON schema: '0' is not of type 'number'",
    ),
    (
        "extract",
        {"schema": {"type": "array", "items": {"type": "string"}}},
        'extract: option \'schema\' must describe an object at its top level ({"type": "object"',
    ),
    (
        "extract",
        {"schema": {"properties": {"a": {}}}},
        (
            'must describe an object at its top level ({"type": "object", "properties": {...}}), '
            'got "type": null'
        ),
    ),
    (
        "extract",
        {"schema": {"type": "object", "properties": {"a": {"$ref": "https://example.com/a"}}}},
        "extract: option 'schema' has a $ref 'https://example.com/a' that does not point inside",
    ),
    (
        "extract",
        {"schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}},
        "extract: option 'schema' has a $ref '#/$defs/missing'",
    ),
    (
        "extract",
        {"schema": {"type": "object", "properties": {"a": {"maximum": float("nan")}}}},
        "extract: option 'schema' is not plain JSON",
    ),
    ("custom", {}, "custom: option 'prompt' is required"),
    (
        "custom",
        {"prompt": "Summarize this."},
        "custom: option 'prompt' must be a string containing",
    ),
    (
        "custom",
        {"prompt": "Summarize { text }"},
        "containing the placeholder {text} (single braces)",
    ),
    ("custom", {"prompt": 42}, "custom: option 'prompt' must be a string containing"),
    (
        "custom",
        {"prompt": "{text}", "stop": "\n"},
        "custom: option 'stop' must be a list of up to 4",
    ),
    ("custom", {"prompt": "{text}", "stop": list("abcde")}, "option 'stop' must be a list of up"),
    (
        "custom",
        {"prompt": "{text}", "stop": [""]},
        "custom: each stop sequence must be a non-empty",
    ),
    (
        "custom",
        {"prompt": "{text}", "temp": 1},
        "unknown option 'temp' (known options: prompt, stop, reduce)",
    ),
]


@pytest.mark.parametrize(("name", "options", "message"), BAD_OPTIONS)
def test_bad_options_get_a_clear_error(name: str, options: Any, message: str) -> None:
    # Given a pipeline name and options a user might get wrong
    # When the pipeline is built / Then a PipelineError names the input and the problem
    with pytest.raises(PipelineError) as caught:
        build_pipeline(name, options)
    assert message in str(caught.value)


def test_good_extract_schemas_are_accepted() -> None:
    # Given schemas with local references and an older draft / When built / Then they validate
    defs = {
        "type": "object",
        "properties": {"who": {"$ref": "#/$defs/person"}},
        "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", **SCHEMA}
    assert build_pipeline("extract", {"schema": defs}).parse(
        '{"who": {"name": "Ada"}}', "stop"
    ) == {"who": {"name": "Ada"}}
    with pytest.raises(OutputParseError, match=r"at \$\.who\.name: 1 is not of type 'string'"):
        build_pipeline("extract", {"schema": defs}).parse('{"who": {"name": 1}}', "stop")
    assert build_pipeline("extract", {"schema": draft7}).parse('{"name": "Ada"}', None)


def test_classify_reads_a_label_of_several_words() -> None:
    # Given labels of more than one word / When the model's label line names one in other case
    classify = build_pipeline("classify", {"labels": ["billing", "bug report", "question"]})
    raw = " app, settings page, crash\nLabel: Bug report\n"

    # Then it is that label, as the user spelled it
    assert classify.parse(raw, "stop") == {"label": "bug report"}
    with pytest.raises(OutputParseError, match="the answer 'bug' is none of the labels"):
        classify.parse(" app\nLabel: bug\n", "stop")


def test_labels_are_stored_trimmed() -> None:
    # Given labels with stray spaces / When built / Then they are stored and answered trimmed
    classify = build_pipeline("classify", {"labels": [" yes ", "no"]})
    assert classify.describe() == {"labels": ["yes", "no"]}
    assert classify.parse("Yes", "stop") == {"label": "yes"}
