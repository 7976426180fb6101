"""The local model's speed with the installed llama.cpp build, optionally beside another build.

    python benchmarks/bench_local_model.py                      # this interpreter's build
    python benchmarks/bench_local_model.py --other /path/python # and another venv's, alternated

Each round loads Gemma 3 270M (two threads, as `docq demo` serves it) in a child process of the
interpreter under test, evaluates a fixed 350-token prompt and generates 64 tokens greedily,
after one warm-up, `--runs` times. Rounds alternate between the builds so that load on a shared
machine falls on both alike. Prints prompt and generation tokens/s (min / median / max), what
each build reports it was compiled for, and writes benchmarks/results/local_model.json.

What decided the README's portable build (GGML_NATIVE=OFF, AVX2/FMA/F16C, no AVX-512, no AMX):
on an AVX2-only CPU a native build compiles the same features and runs no faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import RESULTS_DIR, machine
from docqueue.workers.local.model import default_cache_dir, ensure_model

# Run by the interpreter under test: it needs llama_cpp only.
_CHILD = r"""
import json, sys, time
import llama_cpp
model, runs = sys.argv[1], int(sys.argv[2])
llm = llama_cpp.Llama(model_path=model, n_ctx=2048, n_threads=2, n_threads_batch=2,
                      n_batch=512, verbose=False)
unit = ("Every morning the ferry leaves the harbour at seven, carrying commuters, bicycles and "
        "crates of vegetables to the island market. ")
text = "Summary of the following text in one sentence: "
while len(llm.tokenize(text.encode())) < 350:
    text += unit
prompt = llm.tokenize(text.encode())[:350]

def once():
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    out = []
    for _ in range(64):
        token = llm.sample(temp=0.0, top_k=1)
        out.append(token)
        llm.eval([token])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), 64 / (t2 - t1), out

once()
rows = [once() for _ in range(runs)]
print(json.dumps({"prompt_tps": [r[0] for r in rows], "gen_tps": [r[1] for r in rows],
                  "tokens": rows[0][2],
                  "system_info": llama_cpp.llama_print_system_info().decode().strip()}))
"""


def measure(python: str, model: Path, runs: int) -> dict[str, object]:
    done = subprocess.run([python, "-c", _CHILD, str(model), str(runs)], capture_output=True,
                          text=True, check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def spread(values: list[float]) -> str:
    return f"{min(values):7.1f} / {statistics.median(values):7.1f} / {max(values):7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--other", help="another venv's python, with its own llama.cpp build")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model = ensure_model(default_cache_dir())
    builds = {"installed": sys.executable, **({"other": args.other} if args.other else {})}
    found: dict[str, dict[str, list[float]]] = {b: {"prompt": [], "gen": []} for b in builds}
    info: dict[str, str] = {}
    same_output = True
    first_tokens = None
    for _ in range(args.rounds):
        for name, python in builds.items():
            r = measure(python, model, args.runs)
            found[name]["prompt"] += r["prompt_tps"]  # type: ignore[arg-type]
            found[name]["gen"] += r["gen_tps"]  # type: ignore[arg-type]
            info[name] = str(r["system_info"])
            first_tokens = first_tokens or r["tokens"]
            same_output = same_output and r["tokens"] == first_tokens
    print(f"{'build':<10} {'prompt tok/s min/med/max':>28} {'generation tok/s min/med/max':>31}")
    for name, values in found.items():
        print(f"{name:<10} {spread(values['prompt']):>28} {spread(values['gen']):>31}")
    for name, text in info.items():
        print(f"{name}: {text}")
    print(f"same tokens from every run: {same_output}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "local_model.json"
    out.write_text(json.dumps({"machine": machine(), "builds": builds, "tps": found,
                               "system_info": info, "same_output": same_output}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
