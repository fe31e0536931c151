"""Evaluation reports: one record with every number and setting, written as JSON, Markdown and a PNG of the
per-frame (or per-pair) series and the metric bars; several runs side by side in one Markdown table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from apple_video.errors import InputError


@dataclass(frozen=True)
class MetricInfo:
    label: str
    better: str  # "higher" | "lower" | "1"
    unit: str = ""
    paper: float | None = None  # APPLE student, FFHQ 1000 pairs (REFace protocol), where the scale compares


METRICS: dict[str, MetricInfo] = {
    "id_similarity": MetricInfo("ID similarity (cosine to source)", "higher", "", 0.54),
    "id_similarity_std": MetricInfo("ID similarity std over frames", "lower"),
    "id_closer_to_source": MetricInfo("closer to source than to original", "higher", "%"),
    "retrieval_top1": MetricInfo("ID retrieval top-1", "higher", "%", 90.5),
    "retrieval_top5": MetricInfo("ID retrieval top-5", "higher", "%", 97.0),
    "pose_error_deg": MetricInfo("pose error (yaw/pitch/roll L2)", "lower", "deg", 1.85),
    "expression_error_pct": MetricInfo("expression error (landmarks)", "lower", "% IOD"),
    "fid": MetricInfo("FID", "lower", "", 2.18),
    "flicker_ratio": MetricInfo("face flicker / original's", "1"),
    "flicker_swapped": MetricInfo("face flicker (swapped)", "lower", "grey levels"),
    "flicker_original": MetricInfo("face flicker (original)", "lower", "grey levels"),
    "jitter_ratio": MetricInfo("landmark jitter / original's", "1"),
    "background_psnr_db": MetricInfo("background PSNR", "higher", "dB"),
}
UNBARRED = ("background_psnr_db", "flicker_swapped", "flicker_original", "id_similarity_std")  # other scales
PAPER_NOTE = ("paper column: APPLE student on FFHQ 1000 pairs (REFace protocol: ArcFace IR-SE50 identity, HopeNet pose, "
              "Deep3DFaceRecon expression); only FID, pose and retrieval share units with ours, and only on that data")


@dataclass
class EvalReport:
    kind: str  # "clip" | "image" | "pairs"
    inputs: dict[str, str]
    settings: dict
    models: dict[str, str]  # metric -> the model that measured it
    metrics: dict[str, float | None]
    counts: dict[str, int] = field(default_factory=dict)
    series: dict[str, list[float | None]] = field(default_factory=dict)  # per frame (clip) or per pair
    scale: dict = field(default_factory=dict)  # SimilarityScale fields + "text"
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"{self.kind} evaluation: " + ", ".join(f"{k} {v}" for k, v in self.counts.items())]
        lines += [f"  {METRICS[k].label}: {_fmt(k, v)}" for k, v in self.metrics.items() if k in METRICS]
        if self.scale.get("text"):
            lines.append(f"  {self.scale['text']}")
        return "\n".join(lines)


def _fmt(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    info = METRICS.get(name)
    if info and info.unit == "%":
        return f"{100 * value:.1f}%"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def _clean(value):
    """JSON has no NaN: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(report: EvalReport, path: Path) -> Path:
    path.write_text(json.dumps(_clean(asdict(report)), indent=1, default=str))
    return path


def read_json(path: Path) -> EvalReport:
    try:
        data = json.loads(Path(path).read_text())
        return EvalReport(**data)
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"not an evaluation report (JSON written by `apple-video eval`): {path} ({error})") from None


def markdown(report: EvalReport) -> str:
    rows = ["| metric | value | better | model | paper |", "|---|---|---|---|---|"]
    for name, value in report.metrics.items():
        info = METRICS.get(name)
        if info is None:
            continue
        paper = "" if info.paper is None else (f"{info.paper:g}%" if info.unit == "%" else f"{info.paper:g}")
        rows.append(f"| {info.label} | {_fmt(name, value)} | {info.better} | {report.models.get(name, '')} | {paper} |")
    parts = [f"# Evaluation ({report.kind})", "",
             "\n".join(f"- {k}: `{v}`" for k, v in report.inputs.items()), "",
             ", ".join(f"{k}: {v}" for k, v in report.counts.items()), "", "\n".join(rows), "",
             f"_{PAPER_NOTE}._", ""]
    if report.scale.get("text"):
        parts += ["## Similarity scale", "", report.scale["text"], ""]
    if report.notes:
        parts += ["## Notes", "", "\n".join(f"- {n}" for n in report.notes), ""]
    parts += ["## Settings", "", "```", json.dumps(report.settings, indent=1, default=str), "```", ""]
    return "\n".join(parts)


def plot(report: EvalReport, path: Path) -> Path:
    """Per-frame (per-pair) series on the left, one bar per headline metric on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, list]] = {}  # the two flicker series share a panel
    for name, values in report.series.items():
        if any(v is not None for v in values):
            panels.setdefault("flicker" if name.startswith("flicker_") else name, {})[name] = values
    bars = {k: v for k, v in report.metrics.items()
            if v is not None and k in METRICS and math.isfinite(v) and k not in UNBARRED}
    rows = max(1, len(panels))
    fig = plt.figure(figsize=(11, 2.2 * rows + 0.6))
    grid = fig.add_gridspec(rows, 2, width_ratios=[2.2, 1])
    left = [fig.add_subplot(grid[i, 0]) for i in range(rows)]
    axis_name = "pair" if report.kind == "pairs" else "frame"
    for ax, (panel, members) in zip(left, panels.items(), strict=False):
        for name, values in members.items():
            y = np.array([np.nan if v is None else v for v in values], float)
            x = np.arange(len(y))
            style = "o" if report.kind == "pairs" else (".-" if np.isfinite(y).sum() < 60 else "-")  # pairs: no order
            ax.plot(x[np.isfinite(y)], y[np.isfinite(y)], style, lw=1, ms=3, label=name.replace("_", " "))
        if len(members) > 1:
            ax.legend(fontsize=7)
        ax.set_ylabel(panel.replace("_", " "), fontsize=8)
        ax.grid(alpha=0.3)
    left[-1].set_xlabel(axis_name)
    if not panels:
        left[0].text(0.5, 0.5, "no per-frame series", ha="center", va="center")
    bar_ax = fig.add_subplot(grid[:, 1])
    labels = [METRICS[k].label for k in bars]
    values = [100 * v if METRICS[k].unit == "%" else v for k, v in bars.items()]
    bar_ax.barh(range(len(values)), values, color="tab:blue")
    bar_ax.set_yticks(range(len(values)), labels, fontsize=7)
    bar_ax.invert_yaxis()
    for i, v in enumerate(values):
        bar_ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    bar_ax.set_title("metrics", fontsize=9)
    fig.suptitle(f"apple-video eval ({report.kind}): {', '.join(Path(v).name for v in report.inputs.values())}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(report: EvalReport, prefix: Path) -> list[Path]:
    """prefix.json, prefix.md and prefix.png."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md = prefix.with_suffix(".md")
    md.write_text(markdown(report))
    return [write_json(report, prefix.with_suffix(".json")), md, plot(report, prefix.with_suffix(".png"))]


def compare_table(reports: list[tuple[str, EvalReport]]) -> str:
    """Several runs side by side: one row per metric, one column per run, the paper's value last."""
    names = [n for n, _ in reports]
    metrics = [m for m in METRICS if any(r.metrics.get(m) is not None for _, r in reports)]
    rows = ["| metric | better | " + " | ".join(names) + " | paper |", "|---|---|" + "---|" * len(names) + "---|"]
    for m in metrics:
        info = METRICS[m]
        paper = "" if info.paper is None else (f"{info.paper:g}%" if info.unit == "%" else f"{info.paper:g}")
        cells = [_fmt(m, r.metrics.get(m)) for _, r in reports]
        rows.append(f"| {info.label} | {info.better} | " + " | ".join(cells) + f" | {paper} |")
    models = sorted({f"{m}: {r.models[m]}" for _, r in reports for m in metrics if m in r.models})
    lines = rows + ["", f"_{PAPER_NOTE}._", "", "Models: " + "; ".join(models)]
    scales = sorted({r.scale["text"] for _, r in reports if r.scale.get("text")})
    return "\n".join(lines + [""] + [f"- {s}" for s in scales]) + "\n"
