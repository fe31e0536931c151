"""One job, declared once: plan_job validates every command the same way, and each settings field's declared scope
decides the resume fingerprint, the run record, the classic-ignored warning and what a preview sheet offers."""

from __future__ import annotations

import logging
import pickle
import shutil
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path

import pytest

from apple_video.config import QUALITY_SETTINGS, load_preset, with_overrides, with_quality
from apple_video.engine.job import Job, plan_job, settings_from
from apple_video.engine.run import _fingerprint
from apple_video.errors import InputError, OutputError
from apple_video.evaluate.runner import _run_record
from apple_video.settings import (
    APPLE,
    RUNTIME,
    VIDEO,
    EvalSettings,
    ModelOptions,
    SwapSettings,
    ignored_options,
    output_record,
    setting,
    video_only_options,
)


@dataclass(frozen=True)
class SharperModel(ModelOptions):
    sharpness: float = setting(0.0, scope=(APPLE,), options=("sharpness",))


@dataclass(frozen=True)
class FakeSettings(SwapSettings):
    """SwapSettings with three new options, each declared once, here."""

    model: SharperModel = setting(default_factory=SharperModel)
    sidecar: str = setting("none", scope=(VIDEO,), options=("sidecar",))
    note: str = setting("", scope=(RUNTIME,), options=("note",))


def _parse(command: str, args: list[str]) -> tuple[dict, set[str]]:
    """The options click gives a command for this command line, and the ones typed on it."""
    import cli

    group = cli.evaluate if command == "pairs" else cli.cli
    name = {"pairs": "pairs"}.get(command, command)
    ctx = group.commands[name].make_context(name, list(args))
    params = dict(ctx.params)
    return params, cli._given(ctx, params)


def _plan(command: str, args: list[str]) -> Job:
    params, given = _parse(command, args)
    if command in ("swap", "preview"):
        params = {**params, "paths": params.pop("paths")}
    return plan_job(command, params, given)


def test_a_new_field_is_seen_by_the_fingerprint_the_warning_and_the_preview(tmp_path: Path, source_photo: Path,
                                                                            face_clip: Path) -> None:
    base = FakeSettings(swapper="apple")
    sharper = FakeSettings(swapper="apple", model=SharperModel(sharpness=0.5))
    assert _fingerprint(face_clip, [source_photo], sharper) != _fingerprint(face_clip, [source_photo], base)
    assert output_record(sharper)["model"]["sharpness"] == 0.5
    # video-only: in a video job's fingerprint, not in an image job's run record
    sidecar = FakeSettings(swapper="apple", sidecar="left")
    assert _fingerprint(face_clip, [source_photo], sidecar) != _fingerprint(face_clip, [source_photo], base)
    assert "sidecar" in output_record(sidecar) and "sidecar" not in output_record(sidecar, media="image")
    # runtime-only: neither
    noted = FakeSettings(swapper="apple", note="hello")
    assert _fingerprint(face_clip, [source_photo], noted) == _fingerprint(face_clip, [source_photo], base)
    assert "note" not in output_record(noted)

    assert ignored_options({"sharpness", "seed"}, "classic", FakeSettings) == ["--sharpness"]
    assert ignored_options({"sharpness"}, "apple", FakeSettings) == []
    assert "sidecar" in video_only_options(FakeSettings) and "sharpness" not in video_only_options(FakeSettings)
    assert "sidecar" not in video_only_options()  # the real records do not have it

    # the generic builder reads the new option with no other change
    params, _ = _parse("swap", [str(source_photo), str(face_clip), "-o", str(tmp_path / "o.mp4")])
    built = settings_from({**params, "executor": "local", "num_gpus": 0.0, "sharpness": 0.7, "sidecar": "right"},
                          FakeSettings)
    assert built.model.sharpness == 0.7 and built.sidecar == "right" and built.note == ""


def test_declared_scopes_give_the_lists_that_were_written_by_hand() -> None:
    """What the four hand-written lists said before the scopes replaced them (request.APPLE_ONLY, cli's
    PREVIEW_UNUSED, the fingerprint's and the eval runner's ignored settings)."""
    apple_only = {"preset", "steps", "id_weight", "lora", "second_order", "no_inversion", "recipe", "quality", "fp8",
                  "offload"}
    every_option = apple_only | {"seed", "face_detector", "classic_blend", "chunk_frames", "executor"}
    assert set(ignored_options(every_option, "classic")) == {f"--{n.replace('_', '-')}" for n in apple_only}
    assert ignored_options(every_option, "apple") == ["--classic-blend"]
    assert set(video_only_options()) == {"executor", "ray_address", "num_gpus", "workers", "trim_start", "trim_end",
                                         "chunk_frames", "output_video_encoder", "output_video_quality",
                                         "output_video_preset", "allow_no_faces"}
    record = output_record(SwapSettings())
    assert not {"force", "executor", "ray_address", "workers", "allow_no_faces"} & set(record)
    assert "offload" not in record["model"] and "steps" in record["model"] and "encode" in record


def test_classic_swapper_names_the_apple_options_it_ignores(tmp_path: Path, source_photo: Path, face_clip: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="apple_video"):
        _plan("swap", [str(source_photo), str(face_clip), "-o", str(tmp_path / "o.mp4"), "--swapper", "classic",
                       "--steps", "3", "--quality", "fast", "--seed", "4"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--steps" in warnings[0] and "--quality" in warnings[0]
    assert "--seed" not in warnings[0]  # the classic swapper reads it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="apple_video"):
        _plan("swap", [str(source_photo), str(face_clip), "-o", str(tmp_path / "o.mp4"), "--swapper", "classic"])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_preview_offers_no_video_only_option_and_uses_the_defaults() -> None:
    import cli

    offered = {p.name for p in cli.preview.params}
    assert offered.isdisjoint(video_only_options())
    assert "count" in offered and "face_detector" in offered
    assert set(video_only_options()) <= {p.name for p in cli.swap.params}  # swap still has every option


def test_plan_job_decides_the_kind_once_and_is_a_frozen_picklable_record(tmp_path: Path, source_photo: Path,
                                                                         face_clip: Path, frames_dir: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(face_clip, clips / "a.mp4")
    image = tmp_path / "still.png"
    shutil.copy(source_photo, image)
    cases = {"video": (face_clip, tmp_path / "o.mp4"), "folder": (frames_dir, tmp_path / "frames_out"),
             "image": (image, tmp_path / "o.png"), "batch": (clips, tmp_path / "batch_out")}
    for kind, (target, output) in cases.items():
        job = _plan("swap", [str(source_photo), str(target), "-o", str(output), "--swapper", "classic",
                             "--reference-face-distance", "0.45"])
        assert job.kind == kind and job.target == target and job.output == output
        assert job.settings.selector.reference_face_distance == 0.45
        assert pickle.loads(pickle.dumps(job)) == job
    with pytest.raises(FrozenInstanceError):
        job.kind = "video"  # type: ignore[misc]
    preview = _plan("preview", [str(source_photo), str(face_clip), "-o", str(tmp_path / "s.png"), "--frames", "3"])
    assert preview.command == "preview" and preview.frames == 3 and preview.settings.executor == "local"
    with pytest.raises(InputError, match="preview samples frames"):
        _plan("preview", [str(source_photo), str(frames_dir), "-o", str(tmp_path / "s.png")])
    with pytest.raises(OutputError, match="PNG"):
        _plan("preview", [str(source_photo), str(face_clip), "-o", str(tmp_path / "s.jpg")])


def test_eval_pairs_gets_the_checks_swap_makes(tmp_path: Path, source_photo: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"{source_photo},{source_photo}\n")
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    with pytest.raises(OutputError, match="must be a folder"):
        _plan("pairs", [str(pairs), "-o", str(not_a_folder), "--swapper", "classic"])
    with pytest.raises(OutputError, match="does not exist"):
        _plan("pairs", [str(pairs), "-o", str(tmp_path / "no" / "run"), "--swapper", "classic"])
    with pytest.raises(InputError, match="LoRA file not found"):
        _plan("pairs", [str(pairs), "-o", str(tmp_path / "run"), "--lora", str(tmp_path / "none.safetensors")])
    job = _plan("pairs", [str(pairs), "-o", str(tmp_path / "run"), "--swapper", "classic", "--id-every", "3"])
    assert job.kind == "pairs" and job.sources == (source_photo,) and job.evaluation.id_every == 3


def test_eval_run_record_leaves_out_what_images_do_not_read(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    a = _run_record(pairs, SwapSettings(swapper="classic"), EvalSettings())
    b = _run_record(pairs, SwapSettings(swapper="classic", workers=7, chunk_frames=5, trim_end=9), EvalSettings())
    c = _run_record(pairs, SwapSettings(swapper="classic", seed=3), EvalSettings())
    assert a == b and a != c


def test_quality_paper_after_balanced_gives_the_papers_solver() -> None:
    tiny = load_preset("tiny")
    fast = with_quality(tiny, "fast")
    assert fast.sampling.inversion_solver == "euler" and fast.sampling.solver == "fireflow"
    tuned = with_overrides(with_quality(tiny, "balanced"), inversion_solver="fireflow")
    for start in (fast, tuned):
        paper = with_quality(start, "paper").sampling
        assert paper.inversion_solver is None  # None: the sampling solver, Euler
        assert {k: getattr(paper, k) for k in QUALITY_SETTINGS["paper"]} == QUALITY_SETTINGS["paper"]
    # a None command-line override still means "not given"
    assert with_overrides(fast, inversion_solver=None).sampling.inversion_solver == "euler"
