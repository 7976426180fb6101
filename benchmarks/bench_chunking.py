"""Benchmark token-aware chunking: chunks per second, tokens per second and peak memory.

    python benchmarks/bench_chunking.py [--docs 2000] [--chunk-tokens 400] [--overlap 40]

Documents of about 8,000 tokens are generated one at a time (seeded, so every run splits the
same corpus) and split by `workers.ingest.chunking.Chunker`; only the time spent in `split` counts.
For comparison, a slice of the same corpus goes through langchain-text-splitters'
`RecursiveCharacterTextSplitter.from_tiktoken_encoder` with the same limits, and both run on
text without spaces (CJK), the case where a recursive splitter falls back to single characters.
Prints a table and writes benchmarks/results/chunking.json. Bounded: under a minute.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import tiktoken
from langchain_text_splitters import RecursiveCharacterTextSplitter

from docqueue.workers.ingest.chunking import Chunker
from docqueue.workers.tokens import ENCODING_NAME, count_tokens, encoding

RESULTS = Path(__file__).resolve().parent / "results" / "chunking.json"
COMMON_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their been has when who will more "
    "no if out so said what up its about than into them can only other new some could time "
    "these two may then first any like now my such make over our even most me state after also "
    "made many before must through back years where much your way well down should because each "
    "just those people how too little good very great world own see men work long here between "
    "both life being under never day same another know while last might us great old year off "
    "queue worker broker result document chunk token batch latency throughput retry provider "
    "PostgreSQL Redis Celery inference 2024 3.5 percent revenue quarterly analysis department"
)
WORDS = COMMON_WORDS.split()


def prose(rng: random.Random, tokens: int) -> str:
    """Paragraphs of sentences of common words, about `tokens` tokens long."""
    paragraphs, words = [], 0
    while words < tokens * 0.8:
        sentences = []
        for _ in range(rng.randint(2, 9)):
            n = rng.randint(5, 30)
            sentences.append(" ".join(rng.choices(WORDS, k=n)).capitalize() + rng.choice(".?!."))
            words += n
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def cjk(rng: random.Random, tokens: int) -> str:
    """Chinese-like text with no spaces and few sentence ends."""
    chars = (
        "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学"
    )
    return "".join(rng.choices(chars, k=tokens))


def corpus(make: Callable[[random.Random, int], str], docs: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(docs):
        yield make(rng, rng.randint(6_000, 10_000))


@dataclass
class Row:
    splitter: str
    text: str
    docs: int
    chunks: int
    seconds: float
    cpu_seconds: float  # the machine may be shared: CPU time is the steadier figure
    chunks_per_s: float
    chunks_per_cpu_s: float
    tokens_per_cpu_s: float  # document tokens split per CPU second
    mean_chunk_tokens: float
    max_chunk_tokens: int
    offsets_missing: int  # chunks whose character offsets could not be told


def run_docqueue(name: str, texts: Iterator[str], chunk_tokens: int, overlap: int) -> Row:
    chunker = Chunker(chunk_tokens, overlap)
    docs = chunks = doc_tokens = chunk_total = biggest = 0
    seconds = cpu = 0.0
    for text in texts:
        started, cpu_started = time.perf_counter(), time.process_time()
        spans = chunker.split(text)
        seconds += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
        docs += 1
        chunks += len(spans)
        doc_tokens += len(encoding().encode_ordinary(text))
        chunk_total += sum(s.token_count for s in spans)
        biggest = max([biggest, *(s.token_count for s in spans)])
    return Row(
        "docqueue Chunker", name, docs, chunks, round(seconds, 2), round(cpu, 2),
        round(chunks / seconds), round(chunks / cpu), round(doc_tokens / cpu),
        round(chunk_total / chunks, 1), biggest, 0,
    )  # fmt: skip


def run_langchain(name: str, texts: Iterator[str], chunk_tokens: int, overlap: int) -> Row:
    splitter = RecursiveCharacterTextSplitter.from_tiktoken_encoder(
        encoding_name=ENCODING_NAME,
        chunk_size=chunk_tokens,
        chunk_overlap=overlap,
        disallowed_special=(),  # the default raises on text such as "<|endoftext|>"
        add_start_index=True,
    )
    docs = chunks = doc_tokens = chunk_total = biggest = missing = 0
    seconds = cpu = 0.0
    for text in texts:
        started, cpu_started = time.perf_counter(), time.process_time()
        pieces = splitter.create_documents([text])
        seconds += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
        docs += 1
        chunks += len(pieces)
        doc_tokens += len(encoding().encode_ordinary(text))
        counts = [count_tokens(p.page_content) for p in pieces]
        chunk_total += sum(counts)
        biggest = max([biggest, *counts])
        missing += sum(1 for p in pieces if p.metadata["start_index"] < 0)
    return Row(
        "langchain recursive", name, docs, chunks, round(seconds, 2), round(cpu, 2),
        round(chunks / seconds), round(chunks / cpu), round(doc_tokens / cpu),
        round(chunk_total / chunks, 1), biggest, missing,
    )  # fmt: skip


def rss_mib() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def print_table(rows: list[Row], memory: dict[str, float], per_million_s: float) -> None:
    head = (
        f"{'splitter':<20} {'text':<6} {'docs':>5} {'chunks':>7} {'wall s':>7} {'cpu s':>6}"
        f" {'chunks/s':>9} {'chunks/cpu-s':>12} {'tokens/cpu-s':>12} {'mean tok':>8}"
        f" {'max tok':>7} {'no offset':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.splitter:<20} {r.text:<6} {r.docs:>5} {r.chunks:>7} {r.seconds:>7.2f}"
            f" {r.cpu_seconds:>6.2f} {r.chunks_per_s:>9,} {r.chunks_per_cpu_s:>12,}"
            f" {r.tokens_per_cpu_s:>12,} {r.mean_chunk_tokens:>8} {r.max_chunk_tokens:>7}"
            f" {r.offsets_missing:>9}"
        )
    print()
    print(
        f"memory: {memory['rss_before_mib']} MiB before splitting, peak {memory['peak_rss_mib']}"
        f" MiB after {rows[0].docs} documents (+{memory['growth_mib']} MiB)"
    )
    print(f"1,000,000 chunks of this prose: about {per_million_s:.0f} CPU seconds on one core")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000, help="prose documents for docqueue")
    parser.add_argument("--chunk-tokens", type=int, default=400)
    parser.add_argument("--overlap", type=int, default=40)
    args = parser.parse_args()
    limits = (args.chunk_tokens, args.overlap)

    Chunker(*limits).split(prose(random.Random(0), 1_000))  # load the encoding and its tables
    before = rss_mib()
    rows = [run_docqueue("prose", corpus(prose, args.docs, seed=1), *limits)]
    memory = {
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "growth_mib": round(peak_rss_mib() - before, 1),
    }
    comparison = max(20, args.docs // 10)
    rows.append(run_langchain("prose", corpus(prose, comparison, seed=1), *limits))
    rows.append(run_docqueue("cjk", corpus(cjk, 20, seed=2), *limits))
    rows.append(run_langchain("cjk", corpus(cjk, 20, seed=2), *limits))
    per_million_s = 1_000_000 / rows[0].chunks_per_cpu_s

    print_table(rows, memory, per_million_s)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "tiktoken": tiktoken.__version__,
        },
        "chunk_tokens": args.chunk_tokens,
        "overlap_tokens": args.overlap,
        "rows": [asdict(r) for r in rows],
        "memory": memory,
        "seconds_per_million_chunks": round(per_million_s),
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
