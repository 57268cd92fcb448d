"""PNG plots of a report, drawn with matplotlib's Agg canvas (no pyplot, no global backend change).

* ``quality_ppl.png``: perplexity against bits per weight, every model labelled, the Pareto front
  (no other model has fewer-or-equal bits and lower-or-equal perplexity) drawn as a staircase, the
  float model as a star with a dashed line at its perplexity.
* ``quality_cloze.png``: the same for cloze accuracy (higher is better).
* ``quality_kld.png``: the same for the KL divergence to the reference (``lowbit eval --kld``).
* ``speed.png`` / ``prefill.png``: decode / prefill tokens/s per model (bench data; the float model from
  ``fp_decode_tokens_per_s``; llama.cpp's ``llama-bench`` numbers as a second series when measured).
* ``memory.png``: weight memory (bytes of weights as held in memory) and size on disk, MiB.
* ``peak_rss.png``: peak resident memory of the ``lowbit bench`` and ``lowbit quantize`` processes, MiB.

Each function returns the file name it wrote, or ``None`` when there was no data to draw.
"""
from __future__ import annotations

from pathlib import Path

from .collect import Entry, pareto_front

_FP_COLOR, _Q_COLOR, _FRONT_COLOR = "#444444", "#1f77b4", "#d62728"


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    return fig, fig.add_subplot()


def plot_tradeoff(entries: list[Entry], key: str, out_dir: Path, name: str, ylabel: str,
                  maximize: bool = False) -> str | None:
    """``key`` (a metric) against bits/weight with the Pareto front; ``None`` if fewer than one point."""
    pts = [(e, e.bits_per_weight, e.get(key)) for e in entries]
    pts = [(e, x, y) for e, x, y in pts if x is not None and y is not None]
    if not pts:
        return None
    fig, ax = _figure()
    for e, x, y in pts:
        fp = e.kind == "fp"
        ax.scatter([x], [y], s=90 if fp else 40, marker="*" if fp else "o", color=_FP_COLOR if fp else _Q_COLOR,
                   zorder=3)
        ax.annotate(e.label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if fp:
            ax.axhline(y, color=_FP_COLOR, linestyle="--", linewidth=0.8, zorder=1)
    front = [pts[i] for i in pareto_front([(x, y) for _, x, y in pts], maximize_y=maximize)]
    if len(front) > 1:
        ax.plot([x for _, x, _ in front], [y for _, _, y in front], drawstyle="steps-post", color=_FRONT_COLOR,
                linewidth=1.2, label="Pareto front", zorder=2)
    ax.scatter([x for _, x, _ in front], [y for _, _, y in front], s=110, facecolors="none",
               edgecolors=_FRONT_COLOR, zorder=4, label="Pareto-optimal")
    ax.set_xlabel("bits per weight (all stored bits of the quantized linears)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs bits per weight")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out_dir / name, format="png")
    return name


def _bars(out_dir: Path, name: str, labels: list[str], series: dict[str, list], ylabel: str, title: str):
    import numpy as np

    fig, ax = _figure(max(6.0, 1.1 * len(labels) + 2), 4.5)
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for k, (sname, values) in enumerate(series.items()):
        vals = [np.nan if v is None else v for v in values]
        bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, label=sname)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.3g}" for v in values], fontsize=7)
        for xi, v in zip(x, values):
            if v is None:  # not measured: a dash where the bar would stand
                ax.text(xi + (k - (len(series) - 1) / 2) * width, 0, "–", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / name, format="png")
    return name


def _speed_series(entries: list[Entry], phase: str) -> tuple[list[str], dict[str, list]]:
    """Labels and ``{"lowbit": […], "llama.cpp": […]}`` tokens/s of ``phase`` (decode | prefill); the float
    model's lowbit number from the quantized models' bench (``fp_<phase>_tokens_per_s``) when it has no row."""
    key = f"{phase}_tokens_per_s"
    fp_speed = next((e.get("fp_" + key) for e in entries if e.get("fp_" + key)), None)
    labels = [e.label for e in entries]
    ours = [e.get(key) or (fp_speed if e.kind == "fp" else None) for e in entries]
    if fp_speed is not None and not any(e.kind == "fp" for e in entries):
        labels, ours = labels + ["FP"], ours + [fp_speed]
    series = {"lowbit runtime": ours}
    llama = [e.get(f"llama_cpp_{key}") for e in entries] + [None] * (len(labels) - len(entries))
    if any(v is not None for v in llama):
        series["llama.cpp (llama-bench)"] = llama
    return labels, series


def plot_speed(entries: list[Entry], out_dir: Path) -> str | None:
    """Decode tokens/s bars (lowbit's runtime, llama.cpp's when measured); ``None`` without bench data."""
    labels, series = _speed_series(entries, "decode")
    if not any(v is not None for v in series["lowbit runtime"]):
        return None
    return _bars(out_dir, "speed.png", labels, series, "tokens / s", "Decode speed (batch 1)")


def plot_prefill(entries: list[Entry], out_dir: Path) -> str | None:
    """Prefill tokens/s bars; ``None`` without bench data."""
    labels, series = _speed_series(entries, "prefill")
    if not any(v is not None for v in series["lowbit runtime"]):
        return None
    return _bars(out_dir, "prefill.png", labels, series, "tokens / s", "Prefill speed (batch 1)")


def _mib_bars(entries: list[Entry], out_dir: Path, name: str, cols, title: str) -> str | None:
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    series = {label: [mib(f(e)) for e in entries] for label, f in cols}
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    if not series:
        return None
    return _bars(out_dir, name, [e.label for e in entries], series, "MiB", title)


def plot_memory(entries: list[Entry], out_dir: Path) -> str | None:
    """Weight memory and size-on-disk bars (MiB); ``None`` when neither is known for any model."""
    return _mib_bars(entries, out_dir, "memory.png", (("weight memory", lambda e: e.get("model_bytes")),
                                                      ("size on disk", lambda e: e.disk_bytes)),
                     "Weights in memory and on disk")


def plot_peak_rss(entries: list[Entry], out_dir: Path) -> str | None:
    """Peak RSS of the bench and of the quantize run (MiB); ``None`` when neither was recorded."""
    return _mib_bars(entries, out_dir, "peak_rss.png", (("lowbit bench", lambda e: e.get("peak_rss_bytes")),
                                                        ("lowbit quantize", lambda e: e.run.get("peak_rss_bytes"))),
                     "Peak resident memory of the process")


def write_plots(entries: list[Entry], out_dir: Path) -> list[str]:
    """Every plot there is data for -> the file names written into ``out_dir``."""
    names = [plot_tradeoff(entries, "ppl", out_dir, "quality_ppl.png", "perplexity"),
             plot_tradeoff(entries, "cloze_accuracy", out_dir, "quality_cloze.png", "cloze accuracy", maximize=True),
             plot_tradeoff(entries, "kld", out_dir, "quality_kld.png", "KL divergence to the reference (nats)"),
             plot_speed(entries, out_dir), plot_prefill(entries, out_dir), plot_memory(entries, out_dir),
             plot_peak_rss(entries, out_dir)]
    return [n for n in names if n]
