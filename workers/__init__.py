"""The work itself, with no Celery import: every function here runs from a REPL.

Layers, top to bottom; a module imports only from its own layer or the ones below it
(tests/unit/test_architecture.py checks this and that no import cycle exists):

    jobs/       a job's life: submission, schedules, merging, reconcile, control
    batch/      one batch's delivery: processing, the result writer, leases, cache, guard
    provider/   calling the model: the client, the limiter (Lua in provider/lua/), headers, retry
    pipelines/  what is asked of the model: prompts, parse, per-document merge
    ingest/     reading and cutting: sources, chunking, batching
    settings, errors, tokens, keys, clock   shared by all of the above

Beside the layers, importing only the shared modules: `local/` (the embedded Redis and the
local model server) and `simulator/` (the OpenAI-compatible provider simulator).
"""
