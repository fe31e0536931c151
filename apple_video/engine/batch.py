"""Many clips, one job each, on one pool of workers.

A batch is a list of items (source photos, target clip, output name) from a folder of clips, a .txt list (one
source for every clip) or a manifest (a source per row). It is planned whole before any model is built: each
item's output name is decided once for the batch, each clip probed and each source photo's face found; an item
that cannot run is refused up front in one line and the others run. Per-clip failures while running are reported
and the other clips finish.

Output names: an item writes `OUTPUT_DIR/<its name>` (a manifest row's third column, else the clip's file name).
An item listed twice (same sources, clip and name) runs once. Two different items whose clip names collide get
`-2`, `-3`, ... before the suffix in list order (`a/clip.mp4` -> `clip.mp4`, `b/clip.mp4` -> `clip-2.mp4`); a
name given in a manifest is never changed: a collision with it is refused.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from apple_video.engine.clips import ClipPlan, find_source_faces, plan_video
from apple_video.engine.factories import EngineFactories, quiet_detector
from apple_video.engine.layout import joined_earlier
from apple_video.engine.run import BatchResult, Summary, run_clips
from apple_video.errors import InputError, UserError
from apple_video.faces.detect import FaceDetector
from apple_video.faces.types import SourceFace
from apple_video.media.video import is_video_path
from apple_video.settings import DetectorSettings, SwapSettings

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".tsv")
SOURCE_SEPARATOR = ";"  # several source photos in one manifest cell


@dataclass(frozen=True)
class BatchItem:
    """One line of a batch: whose face, into which clip, under which output name (None: the clip's)."""

    sources: tuple[Path, ...]
    target: Path
    name: str | None = None
    where: str = ""  # for messages: "jobs.csv row 3"


@dataclass(frozen=True)
class BatchPlan:
    """The batch as planned: what runs (in list order), what was refused, what an earlier run finished."""

    clips: tuple[ClipPlan, ...]
    summaries: tuple[Summary | None, ...]  # per item in list order: refused / done earlier, or None: runs
    duplicates: int = 0

    @property
    def refused(self) -> list[Summary]:
        return [s for s in self.summaries if s is not None and s.status != "ok"]


def list_clips(target: Path) -> list[Path]:
    if target.is_dir():
        clips = sorted(p for p in target.iterdir() if p.is_file() and is_video_path(p))
    else:
        lines = [line.strip() for line in target.read_text().splitlines()]
        clips = [Path(line) if Path(line).is_absolute() else target.parent / line for line in lines if line and not line.startswith("#")]
    if not clips:
        raise InputError(f"no video clips in {target}")
    return clips


def is_manifest(path: Path) -> bool:
    return path.suffix.lower() in MANIFEST_SUFFIXES


def read_manifest(path: Path) -> list[BatchItem]:
    """Rows of `source(s), target[, output name]` (comma-separated, or tabs in a .tsv); paths relative to the
    manifest's folder; several sources in one cell separated by `;`. Blank lines and `#` lines are skipped, as is
    a first row `source,target[,output]` (a header)."""
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter=delimiter))
    items: list[BatchItem] = []
    for number, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if number == 1 and [c.lower() for c in cells[:2]] == ["source", "target"]:
            continue
        where = f"{path.name} row {number}"
        if len(cells) not in (2, 3) or not cells[0] or not cells[1]:
            raise InputError(f"{where}: expected `source(s),target[,output name]`, got {len(cells)} columns")
        sources = tuple(_relative(path, s.strip()) for s in cells[0].split(SOURCE_SEPARATOR) if s.strip())
        name = cells[2] if len(cells) == 3 and cells[2] else None
        if name is not None and (Path(name).name != name or not is_video_path(Path(name))):
            raise InputError(f"{where}: the output name must be a video file name (mp4/mov/mkv/webm), not '{name}'")
        items.append(BatchItem(sources, _relative(path, cells[1]), name, where))
    if not items:
        raise InputError(f"no rows in the manifest {path}")
    return items


def _relative(manifest: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else manifest.parent / path


def output_names(items: Sequence[BatchItem]) -> list[str | None]:
    """Each item's output name, decided once for the batch (the rule in the module docstring); None for an item
    listed before (it runs once). A manifest name that another item already holds raises InputError."""
    names: list[str | None] = []
    taken: dict[str, BatchItem] = {}
    seen: set[tuple] = set()
    for item in items:
        identity = (tuple(p.resolve() for p in item.sources), item.target.resolve(), item.name)
        if identity in seen:
            names.append(None)
            continue
        seen.add(identity)
        if item.name is not None:
            if item.name in taken:
                raise InputError(f"{item.where}: output name {item.name} is also {taken[item.name].where or 'used'}"
                                 f"'s; give each row its own")
            taken[item.name] = item
            names.append(item.name)
            continue
        wanted = Path(item.target.name)
        name, number = wanted.name, 1
        while name in taken or any(i.name == name for i in items if i is not item):
            number += 1
            name = f"{wanted.stem}-{number}{wanted.suffix}"
        taken[name] = item
        names.append(name)
    return names


def _refused(item: BatchItem, output: Path, error: Exception) -> Summary:
    where = f"{item.where}: " if item.where else ""
    logger.error("%s%s: %s", where, item.target, error)
    return Summary(str(item.target), str(output), status="failed", error=str(error), refused=True)


def plan_batch(items: Sequence[BatchItem], output_dir: Path, settings: SwapSettings,
               detector: Callable[[DetectorSettings], FaceDetector] = quiet_detector) -> BatchPlan:
    """Plan every item before any model is built: outputs named, clips probed, source faces found (once per set
    of photos). Items that cannot run are refused here, one error line each."""
    names = output_names(items)
    faces: dict[tuple[Path, ...], tuple[SourceFace, ...] | Exception] = {}
    clips: list[ClipPlan] = []
    summaries: list[Summary | None] = []
    duplicates = 0
    for item, name in zip(items, names, strict=True):
        if name is None:
            duplicates += 1
            continue
        output = output_dir / name
        if output.exists() and not settings.force and not joined_earlier(output):  # else: its job folder is left
            summaries.append(Summary(str(item.target), str(output), done_earlier=True))
            continue
        try:
            if item.sources not in faces:
                try:
                    faces[item.sources] = find_source_faces(item.sources, settings, detector)
                except UserError as error:
                    faces[item.sources] = error
            found = faces[item.sources]
            if isinstance(found, Exception):
                raise found
            clips.append(plan_video(item.sources, found, item.target, output, settings))
            summaries.append(None)
        except UserError as error:
            summaries.append(_refused(item, output, error))
    return BatchPlan(tuple(clips), tuple(summaries), duplicates)


def items_for(sources: Sequence[Path], target: Path) -> list[BatchItem]:
    """The items of a batch target: a manifest's rows, or each clip of a folder / .txt list with the same sources."""
    if is_manifest(target):
        return read_manifest(target)
    return [BatchItem(tuple(sources), clip) for clip in list_clips(target)]


def run_planned(plan: BatchPlan, settings: SwapSettings, factories: EngineFactories | None = None) -> BatchResult:
    """Run what a batch plan left to run; summaries in list order (refused and done-earlier items included)."""
    result = run_clips(list(plan.clips), settings, factories=factories, lock=True) if plan.clips else BatchResult([])
    ran = iter(result.summaries)
    result.summaries = [s if s is not None else next(ran) for s in plan.summaries]
    return result


def run_batch(sources: list[Path], target: Path, output_dir: Path, settings: SwapSettings,
              factories: EngineFactories | None = None) -> BatchResult:
    """Plan and run a batch; the result carries the workers' own accounts (model builds, busy time)."""
    items = items_for(sources, target)
    factories = factories or EngineFactories.for_settings(settings)
    plan = plan_batch(items, output_dir, settings, factories.detector)
    output_dir.mkdir(parents=True, exist_ok=True)
    return run_planned(plan, settings, factories)


def swap_batch(sources: list[Path], target: Path, output_dir: Path, settings: SwapSettings,
               factories: EngineFactories | None = None) -> list[Summary]:
    return run_batch(sources, target, output_dir, settings, factories).summaries

