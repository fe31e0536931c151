"""Swap a list of (source, target) photo pairs with one swapper setup, then score it with the paper's image
protocol: ID similarity and retrieval among all sources, pose, expression, and FID against a reference folder.

Output folder: swaps/NNNNN_<source>_<target>.png, scores.jsonl (one row per scored pair, appended as it goes),
run.json (the settings; a rerun with the same settings resumes, skipping done pairs) and report.{json,md,png}.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from apple_video.engine.factories import EngineFactories
from apple_video.engine.still import StillRenderer
from apple_video.errors import InputError, NoFaceError, OutputError
from apple_video.evaluate.clip import eval_files, source_embedding
from apple_video.evaluate.fid import FID_MODEL, FID_WEIGHTS, fid, image_files, load_fid_inception
from apple_video.evaluate.identity import (
    IdentityModel,
    cosine,
    create_identity_model,
    eval_detector,
    measure_scale,
    retrieval,
)
from apple_video.evaluate.landmarks import EXPRESSION_MODEL, expression_distance, pose_distance
from apple_video.evaluate.pose import PoseEstimator, create_pose_estimator
from apple_video.evaluate.report import EvalReport, write_all
from apple_video.faces.detect import DlibDetector
from apple_video.media.images import is_image_path, read_image, write_image
from apple_video.progress import progress
from apple_video.settings import EvalSettings, SwapSettings, output_record
from apple_video.swappers.factory import resolve_swapper_name

logger = logging.getLogger(__name__)

RUN_FILES = ("run.json", "scores.jsonl", "report.json", "report.md", "report.png")


@dataclass(frozen=True)
class Pair:
    index: int
    source: Path
    target: Path

    @property
    def name(self) -> str:
        return f"{self.index:05d}_{self.source.stem}_{self.target.stem}.png"


def read_pairs(path: Path) -> list[Pair]:
    """`source,target` per line (CSV, or tab/space separated .txt); '#' comments and a header line are skipped;
    relative paths are relative to the list's folder."""
    if not path.is_file():
        raise InputError(f"pairs list not found: {path}")
    pairs = []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    rows = csv.reader(lines) if any("," in ln for ln in lines) else (ln.split() for ln in lines)
    for number, row in enumerate(rows, 1):
        cells = [c.strip() for c in row if c.strip()]
        if number == 1 and [c.lower() for c in cells[:2]] == ["source", "target"]:
            continue
        if len(cells) != 2:
            raise InputError(f"{path} line {number}: expected `source,target`, got {row!r}")
        source, target = ((path.parent / c) if not Path(c).is_absolute() else Path(c) for c in cells)
        for p in (source, target):
            if not p.is_file() or not is_image_path(p):
                raise InputError(f"{path} line {number}: not an image file: {p}")
        pairs.append(Pair(len(pairs), source, target))
    if not pairs:
        raise InputError(f"no pairs in {path}")
    return pairs


def _run_record(pairs_file: Path, swap: SwapSettings, evaluation: EvalSettings) -> dict:
    """What the run's swaps depend on (a rerun with another record refuses to mix): the settings that change a
    still image's output, from each field's declared scope."""
    return {"pairs": str(pairs_file.resolve()), "swapper": resolve_swapper_name(swap),
            "swap": output_record(swap, media="image"), "eval": asdict(evaluation)}


def _open_run(folder: Path, record: dict, force: bool) -> None:
    run_file = folder / "run.json"
    if force:  # only what a run writes: the folder may hold the user's other files
        shutil.rmtree(folder / "swaps", ignore_errors=True)
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if json.loads(json.dumps(record, default=str)) != previous:
            raise OutputError(f"{folder} holds a run with other pairs or settings (use --force to start over, "
                              "or another folder)")
        return
    if folder.exists() and any(p.name not in ("swaps", *RUN_FILES) for p in folder.iterdir()) and not force:
        raise OutputError(f"output folder is not empty: {folder} (use --force to overwrite)")
    (folder / "swaps").mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(record, indent=1, default=str))


def _swap_all(pairs: list[Pair], folder: Path, settings: SwapSettings,
              factories: EngineFactories | None = None) -> dict[int, str]:
    """Swap the pairs whose output is missing; returns {index: error} for pairs that could not be swapped."""
    todo = [p for p in pairs if not (folder / "swaps" / p.name).exists()]
    failed: dict[int, str] = {}
    if not todo:
        return failed
    renderer = StillRenderer(settings, factories)  # the swap command's still renderer: same checks, same source faces
    with progress(len(todo), "swap", unit="pair") as bar:
        for pair in todo:
            try:
                renderer.use_sources([pair.source])
                data = read_image(pair.target)
                write_image(folder / "swaps" / pair.name, data, renderer.render(data.rgb, pair.target, False).rgb)
            except NoFaceError as error:
                failed[pair.index] = str(error)
                logger.warning("pair %d skipped: %s", pair.index, error)
            bar.update(1)
    return failed


def score_pair(pair: Pair, swapped: Path, detector: DlibDetector, model: IdentityModel,
               pose: PoseEstimator | None = None) -> dict:
    """Identity embedding of the swapped face, its pose and expression error against the target (a pose that
    cannot be read is null)."""
    pose = pose or PoseEstimator()
    target, result = read_image(pair.target).rgb, read_image(swapped).rgb
    faces_t = detector.detect(target, embed=False)
    faces_s = detector.detect(result, embed=False)
    if not faces_t or not faces_s:
        return {"index": pair.index, "error": "no face in the " + ("target" if not faces_t else "swapped image")}
    face_t, face_s = max(faces_t, key=lambda f: f.area), max(faces_s, key=lambda f: f.area)
    error = pose_distance(pose.angles(target, face_t), pose.angles(result, face_s))
    return {"index": pair.index, "embedding": model.embed(result, face_s).tolist(),
            "pose_error_deg": error if np.isfinite(error) else None,
            "expression_error_pct": expression_distance(face_t.landmarks, face_s.landmarks)}


def _read_scores(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by an interruption: scored again
        rows[row["index"]] = row
    return rows


def run_pairs(pairs_file: Path, folder: Path, swap: SwapSettings, evaluation: EvalSettings = EvalSettings(),
              force: bool = False, factories: EngineFactories | None = None) -> EvalReport:
    """Swap each pair (its models built by `factories`, default: the ones `swap` names), then score them."""
    started = time.perf_counter()
    pairs = read_pairs(pairs_file)
    reference = image_files(Path(evaluation.fid_reference)) if evaluation.fid_reference else None
    files = eval_files(evaluation.identity_model, "auto", fid=reference is not None)  # missing ones fail here
    inception = load_fid_inception(files(FID_WEIGHTS)) if reference else None
    pose = create_pose_estimator("auto", files)  # before the run is opened: its scores depend on which model this is
    _open_run(folder, {**_run_record(pairs_file, swap, evaluation), "pose_model": pose.kind}, force)
    failed = _swap_all(pairs, folder, swap, factories)
    seconds = {"swap": time.perf_counter() - started}

    started = time.perf_counter()
    detector = eval_detector(evaluation.detector_size)
    model = create_identity_model(evaluation.identity_model, detector, files)
    sources = sorted({p.source for p in pairs})
    gallery = np.stack([source_embedding(s, detector, model) for s in sources])
    scores_path = folder / "scores.jsonl"
    scores = _read_scores(scores_path)
    todo = [p for p in pairs if p.index not in scores and (folder / "swaps" / p.name).exists()]
    with progress(len(todo), "score", unit="pair") as bar, scores_path.open("a") as out:
        for pair in todo:
            row = score_pair(pair, folder / "swaps" / pair.name, detector, model, pose)
            scores[pair.index] = row
            out.write(json.dumps(row) + "\n")
            out.flush()
            bar.update(1)
    seconds["score"] = time.perf_counter() - started

    started = time.perf_counter()
    scored = [p for p in pairs if "embedding" in scores.get(p.index, {})]
    fid_value = None
    if inception is not None:
        fid_value = fid(inception, [folder / "swaps" / p.name for p in scored], reference, evaluation.fid_batch)
    seconds["fid"] = time.perf_counter() - started
    report = _pairs_report(pairs_file, folder, pairs, scored, scores, sources, gallery, fid_value, failed,
                           swap, evaluation, model, pose.name)
    scale = measure_scale(model, detector)
    report.scale = {**asdict(scale), "text": scale.text()}
    report.seconds = seconds
    write_all(report, folder / "report")
    return report


def _mean_of(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def _median_of(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.median(finite)) if finite else None


def _pairs_report(pairs_file: Path, folder: Path, pairs: list[Pair], scored: list[Pair], scores: dict[int, dict],
                  sources: list[Path], gallery: np.ndarray, fid_value: float | None, failed: dict[int, str],
                  swap: SwapSettings, evaluation: EvalSettings, model: IdentityModel, pose_name: str) -> EvalReport:
    embeddings = np.array([scores[p.index]["embedding"] for p in scored]) if scored else np.zeros((0, 1))
    labels = [sources.index(p.source) for p in scored]
    sims = [cosine(e, gallery[label]) for e, label in zip(embeddings, labels, strict=True)]
    ranked = retrieval(embeddings, gallery, labels) if scored else None
    metrics = {
        "id_similarity": float(np.mean(sims)) if sims else None,
        "retrieval_top1": ranked.top1 if ranked else None,
        "retrieval_top5": ranked.top5 if ranked else None,
        "pose_error_deg": _mean_of([scores[p.index]["pose_error_deg"] for p in scored]),
        "pose_error_deg_median": _median_of([scores[p.index]["pose_error_deg"] for p in scored]),
        "expression_error_pct": float(np.mean([scores[p.index]["expression_error_pct"] for p in scored])) if scored else None,
        "fid": fid_value,
    }
    per_pair = {p.index: i for i, p in enumerate(scored)}
    series = {
        "id_similarity": [sims[per_pair[p.index]] if p.index in per_pair else None for p in pairs],
        "pose_error_deg": [scores[p.index]["pose_error_deg"] if p.index in per_pair else None for p in pairs],
        "expression_error_pct": [scores[p.index]["expression_error_pct"] if p.index in per_pair else None for p in pairs],
        "retrieval_rank": [float(ranked.ranks[per_pair[p.index]]) if p.index in per_pair else None for p in pairs],
    }
    notes = [f"retrieval among the {len(sources)} distinct sources of the list (the paper: 1000 FFHQ sources)",
             "expression error is landmark-based (the paper uses Deep3DFaceRecon coefficients): compare runs, not papers"]
    notes.append(f"pose: {pose_name}")
    notes += [f"pair {i}: no readable pose (missing, not averaged)" for i in sorted(per_pair)
              if scores[i]["pose_error_deg"] is None]
    notes += [f"pair {i} not swapped: {e}" for i, e in sorted(failed.items())]
    notes += [f"pair {i} not scored: {r['error']}" for i, r in sorted(scores.items()) if "error" in r]
    if fid_value is None:
        notes.append("FID not computed: give --fid-reference FOLDER of real images")
    elif len(scored) < 100:
        notes.append(f"FID on {len(scored)} images is biased upward and noisy; the paper uses 1000")
    models = {"id_similarity": model.name, "retrieval_top1": model.name, "retrieval_top5": model.name,
              "pose_error_deg": pose_name, "pose_error_deg_median": pose_name, "expression_error_pct": EXPRESSION_MODEL,
              "fid": FID_MODEL}
    return EvalReport("pairs", {"pairs": str(pairs_file), "output": str(folder)},
                      {"swap": _run_record(pairs_file, swap, evaluation)["swap"], "eval": asdict(evaluation),
                       "pose_model": "hopenet" if pose_name.startswith("HopeNet") else "landmarks",
                       "swapper": resolve_swapper_name(swap)},
                      models, metrics, {"pairs": len(pairs), "scored": len(scored), "sources": len(sources)}, series,
                      notes=notes, frames={"no_face": [p.index for p in pairs if p.index not in per_pair],
                                           "no_pose": [i for i in sorted(per_pair)
                                                       if scores[i]["pose_error_deg"] is None]})
