"""Evaluation reports: one record with every number and setting, written as JSON, Markdown and a PNG (the
per-frame or per-pair series, frames without a face or a pose marked, beside a table of the figures with the
paper's value and the goal: no axis mixes units); several runs side by side in one Markdown table."""

from __future__ import annotations

import json
import math
import textwrap
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
    goal: str = ""  # what a good swap reads, in the metric's own unit


METRICS: dict[str, MetricInfo] = {
    "id_similarity": MetricInfo("ID similarity (cosine to source)", "higher", "", 0.54, "> same-person line"),
    "id_similarity_std": MetricInfo("ID similarity std over frames", "lower", "", None, "< 0.05"),
    "id_variance": MetricInfo("ID variance over frames (IDBench-V)", "lower", "", None, "< 0.0025"),
    "id_closer_to_source": MetricInfo("closer to source than to original", "higher", "%", None, "100%"),
    "retrieval_top1": MetricInfo("ID retrieval top-1", "higher", "%", 90.5, ">= 90.5%"),
    "retrieval_top5": MetricInfo("ID retrieval top-5", "higher", "%", 97.0, ">= 97%"),
    "pose_error_deg": MetricInfo("pose error (yaw/pitch/roll L2)", "lower", "deg", 1.85, "<= 1.85 deg"),
    "pose_error_deg_median": MetricInfo("pose error (median)", "lower", "deg", None, "<= 1.85 deg"),
    "expression_error_pct": MetricInfo("expression error (landmarks)", "lower", "% IOD", None, "< 5% IOD"),
    "ff10_id_similarity": MetricInfo("FF++ 10 frames: ID similarity", "higher", "", None, "> same-person line"),
    "ff10_pose_error_deg": MetricInfo("FF++ 10 frames: pose error", "lower", "deg", None, "<= 1.85 deg"),
    "ff10_expression_error_pct": MetricInfo("FF++ 10 frames: expression error", "lower", "% IOD", None, "< 5% IOD"),
    "fid": MetricInfo("FID", "lower", "", 2.18, "<= 2.18 (1000 pairs)"),
    "flicker_ratio": MetricInfo("face flicker / original's", "1", "", None, "1 (<= 1.5)"),
    "flicker_swapped": MetricInfo("face flicker (swapped)", "lower", "grey levels", None, "the original's"),
    "flicker_original": MetricInfo("face flicker (original)", "lower", "grey levels"),
    "jitter_ratio": MetricInfo("landmark jitter / original's", "1", "", None, "1 (<= 1.5)"),
    "background_psnr_db": MetricInfo("background PSNR", "higher", "dB", None, ">= 40 dB"),
}
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
    frames: dict[str, list[int]] = field(default_factory=dict)  # no_face, no_pose, ff10: frame indices

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"{self.kind} evaluation: " + ", ".join(f"{k} {v}" for k, v in self.counts.items())]
        lines += [f"  {METRICS[k].label}: {_fmt(k, v)}" for k, v in self.metrics.items() if k in METRICS]
        if "pose_error_deg" in self.models:
            lines.append(f"  pose measured by: {self.models['pose_error_deg']}")
        if self.scale.get("text"):
            lines.append(f"  {self.scale['text']}")
        return "\n".join(lines)


def _fmt(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    info = METRICS.get(name)
    if info and info.unit == "%":
        return f"{100 * value:.1f}%"
    if 0 < abs(value) < 0.01:  # variances: three decimals would read 0.000
        return f"{value:.2e}"
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


def _write_text(path: Path, text: str) -> Path:
    """Temp-then-rename: a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_json(report: EvalReport, path: Path) -> Path:
    return _write_text(path, json.dumps(_clean(asdict(report)), indent=1, default=str))


def read_json(path: Path) -> EvalReport:
    try:
        data = json.loads(Path(path).read_text())
        return EvalReport(**data)
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"not an evaluation report (JSON written by `apple-video eval`): {path} ({error})") from None


def markdown(report: EvalReport) -> str:
    rows = ["| metric | value | better | model | paper | goal |", "|---|---|---|---|---|---|"]
    for name, value in report.metrics.items():
        info = METRICS.get(name)
        if info is None:
            continue
        rows.append(f"| {info.label} | {_fmt(name, value)} | {info.better} | {report.models.get(name, '')} | "
                    f"{_paper(info)} | {info.goal} |")
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


def _paper(info: MetricInfo) -> str:
    return "" if info.paper is None else (f"{info.paper:g}%" if info.unit == "%" else f"{info.paper:g}")


def _value_with_unit(name: str, value: float | None) -> str:
    unit = METRICS[name].unit
    text = _fmt(name, value)
    return text if text == "n/a" or unit in ("", "%") else f"{text} {unit}"


def _broken_at(x: np.ndarray, y: np.ndarray, gaps: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """The measured points x (indices into y), with a NaN between two of them that straddle a gap frame, so that
    the line is not drawn across frames without a face (or without a pose)."""
    xs, ys = [], []
    for i, index in enumerate(x):
        if i and any(g in gaps for g in range(int(x[i - 1]) + 1, int(index))):
            xs.append(np.nan)
            ys.append(np.nan)
        xs.append(float(index))
        ys.append(float(y[index]))
    return np.array(xs), np.array(ys)


def _series_panel(ax, report: EvalReport, members: dict[str, list], label: str) -> None:
    """One quantity per panel; frames without a face shaded grey, frames without a pose marked on the pose panel."""
    gaps = set(report.frames.get("no_face", []))
    if label.startswith("pose"):
        gaps |= set(report.frames.get("no_pose", []))
    for name, values in members.items():
        y = np.array([np.nan if v is None else v for v in values], float)
        style = "o" if report.kind == "pairs" else (".-" if np.isfinite(y).sum() < 60 else "-")  # pairs: no order
        x, y = _broken_at(np.flatnonzero(np.isfinite(y)), y, gaps)
        ax.plot(x, y, style, lw=1, ms=3, label=name.removesuffix("_deg").removesuffix("_pct").replace("_", " "))
    for index in report.frames.get("no_face", []):
        ax.axvspan(index - 0.5, index + 0.5, color="0.85", lw=0, zorder=0)
    if label.startswith("pose") and report.frames.get("no_pose"):
        missing = report.frames["no_pose"]
        ax.plot(missing, [0.0] * len(missing), "x", color="tab:red", ms=5, label="no pose")
    if len(members) > 1 or (label.startswith("pose") and report.frames.get("no_pose")):
        ax.legend(fontsize=7)
    unit = METRICS[next(iter(members))].unit if next(iter(members)) in METRICS else ""
    unit = unit or ("grey levels" if label == "flicker" else "")
    name = label.removesuffix("_deg").removesuffix("_pct").replace("_", " ")
    ax.set_ylabel(name + (f" ({unit})" if unit else ""), fontsize=8)
    ax.grid(alpha=0.3)


def plot(report: EvalReport, path: Path) -> Path:
    """Per-frame (per-pair) series on the left, one panel and one unit each; on the right a table of every figure
    with its paper value and goal (numbers in different units are not drawn on a common axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, list]] = {}  # the two flicker series share a panel (one unit)
    for name, values in report.series.items():
        if any(v is not None for v in values):
            panels.setdefault("flicker" if name.startswith("flicker_") else name, {})[name] = values
    rows = max(1, len(panels))
    names = [k for k in report.metrics if k in METRICS]
    fig = plt.figure(figsize=(14, max(2.2 * rows + 0.8, 0.28 * len(names) + 1.6)))
    grid = fig.add_gridspec(rows, 2, width_ratios=[1.6, 1.4])
    left = [fig.add_subplot(grid[i, 0]) for i in range(rows)]
    for ax, (panel, members) in zip(left, panels.items(), strict=False):
        _series_panel(ax, report, members, panel)
    left[-1].set_xlabel("pair (grey: not scored)" if report.kind == "pairs" else "frame (grey: no face)")
    if not panels:
        left[0].text(0.5, 0.5, "no per-frame series", ha="center", va="center")
        left[0].set_axis_off()
    table_ax = fig.add_subplot(grid[:, 1])
    table_ax.set_axis_off()
    cells = [[METRICS[k].label, _value_with_unit(k, report.metrics[k]), _paper(METRICS[k]), METRICS[k].goal]
             for k in names]
    if cells:
        table = table_ax.table(cellText=cells, colLabels=["figure", "this run", "paper", "goal"], loc="upper center",
                               cellLoc="left", colLoc="left", colWidths=[0.45, 0.2, 0.1, 0.22])
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        table.scale(1, 1.25)
    pose_model = report.models.get("pose_error_deg", "")
    title = "figures (each in its own unit)" + (f"\npose: {pose_model}" if pose_model else "")
    table_ax.set_title(textwrap.fill(title, 90, replace_whitespace=False), fontsize=8)
    fig.suptitle(f"apple-video eval ({report.kind}): {', '.join(Path(v).name for v in report.inputs.values())}",
                 fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.part.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_all(report: EvalReport, prefix: Path) -> list[Path]:
    """prefix.json, prefix.md and prefix.png."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md = _write_text(prefix.with_suffix(".md"), markdown(report))
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
