"""The reduce stage's rules: chunk and group sizes from the context, how a document moves on,
and the merges that need no model."""

from __future__ import annotations

from typing import Any

import pytest

from docqueue.workers.errors import PipelineError
from docqueue.workers.jobs import sizing
from docqueue.workers.jobs.reducing import Step, group_steps, level_batch_seq, plan_document
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.settings import Settings
from docqueue.workers.tokens import count_tokens

SUMMARIZE = build_pipeline("summarize", {})


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"llm_base_url": "http://provider", "llm_mode": "chat"} | overrides
    return Settings(**values)


def ok(seq: int, text: str, level: int = 0) -> Step:
    return Step(level, seq, seq * 10, seq * 10 + 9, "ok", {"summary": text})


def test_a_chunk_is_as_large_as_the_context_allows_after_prompt_output_and_reserve() -> None:
    # Given a 4,096-token window and a 256-token output cap
    cfg = settings(llm_model="some-model", llm_context_tokens=4096, llm_max_tokens=256)
    empty = SUMMARIZE.render("", "chat")
    # When the chunk size is asked for / Then it is what is left of the window
    from docqueue.workers.batch.calls import prompt_tokens

    expected = 4096 - prompt_tokens(empty) - 256 - 409
    assert sizing.chunk_tokens(cfg, SUMMARIZE) == expected
    # and DOCQ_CHUNK_TOKENS still decides when set
    assert sizing.chunk_tokens(settings(chunk_tokens=400), SUMMARIZE) == 400


def test_known_models_have_their_window_and_unknown_ones_a_modest_guess() -> None:
    assert settings(llm_model="gpt-4o-mini").context_tokens == 128_000
    assert Settings().context_tokens == 2048  # the local model, as its server is started
    assert settings(llm_model="my-own-model").context_tokens == 4096
    assert settings(llm_model="gpt-4o-mini", llm_context_tokens=8000).context_tokens == 8000


def test_a_context_too_small_for_the_prompt_is_refused_with_the_numbers() -> None:
    cfg = settings(llm_model="m", llm_context_tokens=300, llm_max_tokens=256)
    with pytest.raises(PipelineError, match=r"a context of 300 tokens .* leaves -?\d+ tokens"):
        sizing.chunk_tokens(cfg, SUMMARIZE)
    with pytest.raises(PipelineError, match="less than two answers of up to 256 tokens"):
        sizing.reduce_group_tokens(cfg, SUMMARIZE)


def test_groups_fill_the_budget_in_order_and_hold_at_least_two() -> None:
    # Given ten answers of the same size and a budget for three of them
    steps = [ok(i, f"Answer number {i} is here.") for i in range(10)]
    each = count_tokens("Answer number 1 is here.") + 1
    groups = group_steps(steps, SUMMARIZE, 3 * each)
    # Then they are grouped three by three, in order
    assert [[s.seq for s in g] for g in groups] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    # and a budget smaller than two answers still puts two in each group
    assert [len(g) for g in group_steps(steps, SUMMARIZE, 1)] == [2, 2, 2, 2, 2]


def test_a_document_waits_reduces_or_is_done() -> None:
    chunks = [ok(0, "A."), ok(1, "B."), ok(2, "C.")]
    # A chunk without a final row: the document waits
    waiting = plan_document([*chunks[:2], Step(0, 2, 20, 29, None)], SUMMARIZE, 1000)
    assert waiting.state == "pending"
    # All final, more than one answer, a pipeline that reduces: the next level, one group
    plan = plan_document(chunks, SUMMARIZE, 1000)
    assert plan.state == "reduce" and plan.levels == 0
    assert [[s.seq for s in g] for g in plan.groups] == [[0, 1, 2]]
    # One answer left at the top: done with it
    done = plan_document([*chunks, ok(0, "ABC.", level=1)], SUMMARIZE, 1000)
    assert done.state == "done" and done.levels == 1 and done.outputs == [{"summary": "ABC."}]
    # A job without a reduce size (submitted before reduces existed, or cancelled): merged as is
    assert plan_document(chunks, SUMMARIZE, None).outputs == [c.output for c in chunks]


def test_failed_chunks_are_left_out_and_a_failed_level_falls_back_to_the_one_below() -> None:
    failed = Step(0, 1, 10, 19, "error", error_message="boom")
    plan = plan_document([ok(0, "A."), failed, ok(2, "C.")], SUMMARIZE, 1000)
    assert [[s.seq for s in g] for g in plan.groups] == [[0, 2]]
    # a reduce level none of whose steps succeeded (its budget spent): the chunks' answers
    skipped = Step(1, 0, 0, 29, "skipped_budget")
    done = plan_document([ok(0, "A."), failed, ok(2, "C."), skipped], SUMMARIZE, 1000)
    assert done.state == "done" and done.outputs == [{"summary": "A."}, {"summary": "C."}]


def test_reduce_batches_are_numbered_below_zero_one_per_document_and_level() -> None:
    seqs = {level_batch_seq(d, level) for d in range(1, 50) for level in range(1, 10)}
    assert len(seqs) == 49 * 9 and max(seqs) < 0


def test_extract_merges_objects_by_key_fields_first_value_winning() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "year": {"type": ["integer", "null"]},
                                               "city": {"type": ["string", "null"]}}}
    keyed = build_pipeline("extract", {"schema": schema, "key": ["name"]})
    merged = keyed.merge([{"name": "Ada", "year": None, "city": "London"},
                          {"name": "Bo", "year": 1990, "city": None},
                          {"name": "Ada", "year": 1843, "city": "Paris"}])
    assert merged == {"items": [{"name": "Ada", "year": 1843, "city": "London"},
                                {"name": "Bo", "year": 1990, "city": None}]}
    # Without key fields: every object, exact duplicates once
    plain = build_pipeline("extract", {"schema": schema})
    assert plain.merge([{"name": "Ada"}, {"name": "Bo"}, {"name": "Ada"}]) == {
        "items": [{"name": "Ada"}, {"name": "Bo"}]}
    with pytest.raises(PipelineError, match="key field 'town' is not a property"):
        build_pipeline("extract", {"schema": schema, "key": ["town"]})


def test_custom_reduces_only_with_a_reduce_template() -> None:
    plain = build_pipeline("custom", {"prompt": "List the nouns: {text}"})
    assert not plain.reduces and plain.merge([{"text": "a"}, {"text": "b"}]) == {
        "texts": ["a", "b"]}
    reducing = build_pipeline("custom", {"prompt": "Nouns: {text}",
                                         "reduce": "Merge these noun lists: {text}"})
    assert reducing.reduces and reducing.version != plain.version
    prompt = reducing.render(reducing.reduce_text([{"text": "a"}, {"text": "b"}]), "chat", 1)
    assert prompt.messages is not None
    assert prompt.messages[1]["content"] == "Merge these noun lists: a\n\nb"
    with pytest.raises(PipelineError, match="option 'reduce' must be a string containing"):
        build_pipeline("custom", {"prompt": "{text}", "reduce": "no placeholder"})


def test_pipelines_that_do_not_reduce_keep_their_version() -> None:
    # The reduce template is part of the version only where there is one: results (and cached
    # answers) of classify and of custom without --reduce stay valid (versions as before)
    classify = build_pipeline("classify", {"labels": ["a", "b"]})
    custom = build_pipeline("custom", {"prompt": "Nouns: {text}"})
    assert (classify.version, custom.version) == ("classify-r1-905852304b51",
                                                  "custom-r1-9aad37b60fb2")
    assert not classify.reduces and SUMMARIZE.reduces
