"""The Grafana dashboard's panels, read from its JSON, queried from a Prometheus and drawn with
matplotlib: the dashboard where no Grafana can be installed (docs/dashboard.png).

    python benchmarks/dashboard.py http://127.0.0.1:9090 START END docs/dashboard.png

START and END are Unix times. tests/integration/test_prometheus.py uses the same queries
against a real Prometheus, and draws this picture when DOCQ_DASHBOARD_PNG names a file.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "docqueue.json"
RATE_INTERVAL = "15s"  # Grafana's $__rate_interval for a 1 s scrape (4 x the interval, rounded)


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: list[Target]


def panels(rate_interval: str = RATE_INTERVAL) -> list[Panel]:
    """The dashboard's panels, with Grafana's `$__rate_interval` replaced."""
    board = json.loads(DASHBOARD.read_text())
    return [Panel(p["title"], p["fieldConfig"]["defaults"].get("unit", ""),
                  [Target(t["expr"].replace("$__rate_interval", rate_interval), t["legendFormat"])
                   for t in p["targets"]]) for p in board["panels"]]


def query(prometheus: str, path: str, **params: str | float) -> list[dict[str, Any]]:
    """One call of Prometheus's HTTP API; its `data.result`."""
    url = f"{prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body}")
    return list(body["data"]["result"])


def legend(template: str, labels: dict[str, str]) -> str:
    for name, value in labels.items():
        template = template.replace("{{" + name + "}}", value)
    return template


def render(prometheus: str, start: float, end: float, out: Path) -> None:
    """Draw every panel over [start, end] in a grid, as the dashboard lays them out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = panels()
    rows = (len(found) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.1 * rows), squeeze=False)
    step = max(1.0, (end - start) / 200)
    for ax, panel in zip(axes.flat, found, strict=False):
        for target in panel.targets:
            for series in query(prometheus, "query_range", query=target.expr, start=start,
                                end=end, step=step):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(target.legend, series["metric"]))
        ax.set_title(f"{panel.title} ({panel.unit})", fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(found):]:
        ax.axis("off")
    fig.suptitle("docqueue: the Grafana dashboard's queries against Prometheus", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: python benchmarks/dashboard.py PROMETHEUS_URL START END OUT.png")
    render(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]))
