"""What runs on one machine with nothing but Python: the embedded Redis, the local model and
the demo corpus (`corpus/`, package data, so that `docq demo` finds it from a wheel too)."""

from pathlib import Path

DEMO_CORPUS = Path(__file__).resolve().parent / "corpus"
