"""`docq simulate` / `python -m workers.simulator`: parse options and run the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from docqueue.workers.testing.simulator.config import (
    DEFAULT_MODEL,
    MIB,
    BatchApiConfig,
    ConfigError,
    SimulatorConfig,
)
from docqueue.workers.testing.simulator.prefix_cache import DEFAULT_CAPACITY_BLOCKS

PROG = "docq simulate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="An OpenAI-compatible server for tests and benchmarks: it enforces "
        "requests and tokens per minute with real 429s and headers, and injects latency "
        "and faults. Streaming is not supported (stream=true gets a 400).",
    )
    net = p.add_argument_group("network")
    net.add_argument(
        "--host", metavar="HOST", default="127.0.0.1", help="address to bind (default 127.0.0.1)"
    )
    net.add_argument(
        "--port", metavar="PORT", type=int, default=8000, help="port (default 8000; 0 = any free)"
    )
    net.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help=f"a model name to serve; repeatable (default {DEFAULT_MODEL})",
    )
    net.add_argument(
        "--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (default: no check)"
    )
    net.add_argument(
        "--max-body-bytes",
        metavar="BYTES",
        type=int,
        default=8 * MIB,
        help="larger request bodies get 413 (default 8 MiB)",
    )
    lim = p.add_argument_group("rate limits (token buckets refilled continuously)")
    lim.add_argument("--rpm", metavar="N", type=int, help="requests per minute (default unlimited)")
    lim.add_argument(
        "--tpm",
        metavar="N",
        type=int,
        help="tokens per minute (default unlimited); a request "
        "costs its prompt tokens + max_tokens per choice",
    )
    lim.add_argument(
        "--period-s",
        metavar="S",
        type=float,
        default=60.0,
        help="the window --rpm and --tpm are per, in seconds (default 60, as OpenAI meters); "
        "a shorter one lets a test see whole windows pass (pair with DOCQ_LLM_LIMIT_PERIOD_S)",
    )
    lim.add_argument(
        "--default-max-tokens",
        metavar="N",
        type=int,
        default=256,
        help="output cap and TPM charge when a request has no max_tokens (256)",
    )
    lim.add_argument(
        "--context-limit",
        type=int,
        metavar="N",
        help="prompts over N tokens get 400 context_length_exceeded",
    )
    out = p.add_argument_group("output and latency")
    out.add_argument(
        "--output-tokens-mean",
        metavar="TOKENS",
        type=float,
        default=60.0,
        help="mean reply length in tokens (default 60)",
    )
    out.add_argument(
        "--output-tokens-sd",
        metavar="TOKENS",
        type=float,
        default=20.0,
        help="standard deviation of the reply length (default 20)",
    )
    out.add_argument(
        "--latency-ms", metavar="MS", type=float, default=0.0, help="fixed latency (default 0)"
    )
    out.add_argument(
        "--ms-per-token",
        metavar="MS",
        type=float,
        default=0.0,
        help="extra latency per output token (default 0)",
    )
    out.add_argument(
        "--jitter-ms",
        metavar="MS",
        type=float,
        default=0.0,
        help="extra latency drawn uniformly from [0, J] (default 0)",
    )
    out.add_argument(
        "--prefix-cache-blocks", metavar="N", type=int, default=DEFAULT_CAPACITY_BLOCKS,
        help="the prompt cache: a prompt's prefix of at least 1024 tokens that an earlier "
        "request of the same model and prompt_cache_key sent is reported in usage."
        "prompt_tokens_details.cached_tokens, in steps of 128 tokens; N blocks of 128 tokens "
        f"are remembered, least recently used forgotten first (default {DEFAULT_CAPACITY_BLOCKS}"
        "; 0 = off)")
    out.add_argument(
        "--slots", metavar="N", type=int, help="a self-hosted server: decode at most N requests "
        "at once, queue the rest (default: no limit)")
    out.add_argument(
        "--saturation", metavar="K", type=int, help="with --slots: decoding more than K requests "
        "together slows each one by (decoding/K), so throughput stops growing at K")
    flt = p.add_argument_group("faults (rates from 0 to 1; their sum at most 1)")
    flt.add_argument(
        "--fail-rate",
        metavar="RATE",
        type=float,
        default=0.0,
        help="share of admitted requests answered 500, 502 or 503",
    )
    flt.add_argument(
        "--timeout-rate",
        metavar="RATE",
        type=float,
        default=0.0,
        help="share held open for --timeout-hold-s",
    )
    flt.add_argument(
        "--garbage-rate",
        metavar="RATE",
        type=float,
        default=0.0,
        help="share answered 200 with a malformed body",
    )
    flt.add_argument(
        "--flex-unavailable-rate",
        metavar="RATE",
        type=float,
        default=0.0,
        help="share of service_tier=flex requests answered 429 resource_unavailable",
    )
    flt.add_argument(
        "--timeout-hold-s",
        metavar="SECONDS",
        type=float,
        default=600.0,
        help="how long a timeout fault holds a request (default 600)",
    )
    flt.add_argument(
        "--seed", metavar="N", type=int, help="seed for fault and jitter draws (default random)"
    )
    _add_batch_api_arguments(p)
    p.add_argument("--log-requests", action="store_true", help="log one line per request")
    p.add_argument(
        "--record-requests",
        action="store_true",
        help="keep each completion request's start and end time, status and prompt text for "
        "GET /requests (for tests: memory grows with every request)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Raises ConfigError naming the option when a value is unusable."""
    return SimulatorConfig(
        host=args.host,
        port=args.port,
        models=tuple(args.models) if args.models else (DEFAULT_MODEL,),
        rpm=args.rpm,
        tpm=args.tpm,
        period_s=args.period_s,
        default_max_tokens=args.default_max_tokens,
        output_tokens_mean=args.output_tokens_mean,
        output_tokens_sd=args.output_tokens_sd,
        latency_ms=args.latency_ms,
        ms_per_token=args.ms_per_token,
        jitter_ms=args.jitter_ms,
        slots=args.slots,
        saturation=args.saturation,
        fail_rate=args.fail_rate,
        timeout_rate=args.timeout_rate,
        garbage_rate=args.garbage_rate,
        timeout_hold_s=args.timeout_hold_s,
        flex_unavailable_rate=args.flex_unavailable_rate,
        context_limit=args.context_limit,
        prefix_cache_blocks=args.prefix_cache_blocks,
        api_key=args.api_key,
        seed=args.seed,
        max_body_bytes=args.max_body_bytes,
        log_requests=args.log_requests,
        record_requests=args.record_requests,
        batch_api=BatchApiConfig(
            turnaround_s=args.batch_turnaround_s,
            window_s=args.batch_window_s,
            fail_rate=args.batch_fail_rate,
            enqueued_token_limit=args.batch_enqueued_token_limit,
            max_requests=args.batch_max_requests,
            max_file_bytes=args.batch_max_file_bytes,
        ),
    )


def _add_batch_api_arguments(p: argparse.ArgumentParser) -> None:
    bat = p.add_argument_group("Batch API (/v1/files, /v1/batches)")
    bat.add_argument(
        "--batch-turnaround-s",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="a batch's lines are done evenly over this time (default 0: at once)",
    )
    bat.add_argument(
        "--batch-window-s",
        metavar="SECONDS",
        type=float,
        default=86_400.0,
        help="a batch not done this long after creation expires with what it did (24 h)",
    )
    bat.add_argument(
        "--batch-fail-rate",
        metavar="RATE",
        type=float,
        default=0.0,
        help="share of executed lines answered 500 in the error file (default 0)",
    )
    bat.add_argument(
        "--batch-enqueued-token-limit",
        metavar="TOKENS",
        type=int,
        help="prompt tokens a model may have in unfinished batches; a batch past it fails "
        "with token_limit_exceeded (default unlimited)",
    )
    bat.add_argument(
        "--batch-max-requests",
        metavar="N",
        type=int,
        default=50_000,
        help="requests per batch file (default 50,000)",
    )
    bat.add_argument(
        "--batch-max-file-bytes",
        metavar="BYTES",
        type=int,
        default=200 * MIB,
        help="bytes per uploaded file (default 200 MiB)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGTERM/SIGINT; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    from docqueue.workers.testing.simulator.server import (
        serve,  # aiohttp only when the server really runs
    )

    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(
            f"{PROG}: error: cannot listen on {config.host}:{config.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        pass
    return 0
