"""Summarize py-spy raw profiles (`--format raw`, folded stacks): where a worker's CPU went.

    python benchmarks/profile_summary.py FILE.folded [FILE.folded ...] [--top 10]

Each sample is given to one part of the system: the innermost frame of a known library or of
docqueue decides (the model client stack, Redis, SQL, Celery, logging, tokenization, ...), and
one made of the standard library only is the event loop's or the interpreter's. Prints the
share of each part, and the top frames by own samples (the leaf function) and by inclusive
samples (a function anywhere in the stack), over all the files given.

`bench_overhead.py --profile` writes such files to benchmarks/results/ (one per worker child).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# (part, patterns on a frame's file): the first part whose pattern matches the innermost
# frame that matches any decides. The model client: everything between the batch code and
# the socket, docqueue's own wrappers included.
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("model client", (r"\bopenai/", r"langchain", r"\bhttpx/", r"httpx_aiohttp", r"\baiohttp/",
                      r"multidict", r"yarl/", r"pydantic", r"provider/client\.py",
                      r"provider/lean\.py", r"batch/metering\.py", r"\bh11/", r"httpcore",
                      r"anyio/", r"http/cookiejar", r"urllib/request", r"\bdistro",
                      r"ssl\.py")),
    ("redis", (r"\bredis/", r"provider/limiter\.py", r"provider/admission\.py",
               r"batch/liveness\.py", r"batch/guard\.py", r"batch/trouble\.py")),
    ("sql", (r"sqlalchemy", r"psycopg", r"models/", r"batch/leases\.py", r"batch/writer\.py",
             r"batch/cache\.py", r"batch/story\.py", r"jobs/merging\.py")),
    ("tokenization", (r"tiktoken", r"workers/tokens\.py")),
    ("celery/kombu", (r"\bcelery/", r"\bkombu/", r"\bbilliard/", r"\bvine/", r"tasks/")),
    ("logging/metrics", (r"logging/", r"prometheus", r"workers/metrics\.py")),
    ("json", (r"\bjson/",)),
    ("batch code", (r"workers/batch/", r"workers/pipelines/", r"workers/provider/")),
    ("event loop", (r"asyncio/", r"selectors\.py", r"concurrent/futures", r"threading\.py",
                    r"\bqueue\.py")),
]
# Leaves where a thread waits rather than works (py-spy --nonblocking cannot tell an idle
# thread from a busy one): an empty executor thread, the event loop's poll.
WAITING = re.compile(r"^(_worker \(concurrent/futures/thread\.py|EpollSelector\.select |"
                     r"Condition\.wait |Event\.wait |Thread\._wait_for_tstate_lock )")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """(stack outermost first as (function, file) pairs, samples) per line of a raw profile."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for part in stack.split(";"):
            m = FRAME.match(part)
            frames.append((m["func"], m["file"]) if m else (part, ""))
        stacks.append((frames, int(count)))
    return stacks


def part_of(frames: list[tuple[str, str]]) -> str:
    for _, file in reversed(frames):
        for part, patterns in PARTS:
            if any(re.search(p, file) for p in patterns):
                return part
    return "other"


def summarize(paths: list[Path], top: int) -> str:
    parts: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = waiting = 0
    for path in paths:
        for frames, n in parse(path):
            func, file = frames[-1]
            if WAITING.match(f"{func} ({file})"):
                waiting += n
                continue
            total += n
            parts[part_of(frames)] += n
            own[f"{func} ({file})"] += n
            for name in {f"{f} ({fl})" for f, fl in frames}:
                inclusive[name] += n
    if not total:
        return "no samples"
    lines = [f"{total:,} busy samples in {len(paths)} file(s) ({waiting:,} more in waits, left "
             "out: an idle executor thread, the event loop's poll)", "", "share by part:"]
    lines += [f"  {share:6.1%}  {part}" for part, share in
              ((p, n / total) for p, n in parts.most_common())]
    lines += ["", f"top {top} frames by own samples:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    skip = re.compile(r"threading\.py|asyncio/(base_events|events|runners)\.py|celery/|billiard/|"
                      r"kombu/|<frozen")
    lines += ["", f"top {top} frames by inclusive samples (below the event loop and Celery):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in
              [(k, v) for k, v in inclusive.most_common() if not skip.search(k)][:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        sys.exit(f"error: no such profile: {', '.join(missing)}")
    print(summarize(args.files, args.top))


if __name__ == "__main__":
    main()
