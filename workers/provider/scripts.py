"""The limiter's Lua scripts, read from the `.lua` files beside this module.

Each script is the shared prelude (`lua/prelude.lua`: the key layout, the clock, the refill)
followed by its own body, so every step runs as one atomic script against Redis's clock.
"""

from __future__ import annotations

from importlib.resources import files


def _read(name: str) -> str:
    return files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


PRELUDE = _read("prelude")
ACQUIRE = PRELUDE + _read("acquire")
FINISH = PRELUDE + _read("finish")
COOL_DOWN = PRELUDE + _read("cool_down")
SNAPSHOT = PRELUDE + _read("snapshot")
KEEP_ALIVE = _read("keep_alive")
