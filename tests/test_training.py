"""The training pipeline at toy scale on a CPU: prepare-data -> teacher -> pseudo-labels -> student."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests import synth
from training.config import load_train_config
from training.data import FaceData, prepare_data
from training.deblur import deblur_condition, downsample_blur
from training.iris import runtime_available as iris_runtime_available
from training.loop import Batch, Trainer
from training.stages import TeacherSampler, make_pseudo_labels, train_student, train_teacher

ROOT = Path(__file__).resolve().parent.parent
HOPPER_BOX = (161, 137, 376, 352)


def test_deblur_touches_only_the_mask(astronaut: np.ndarray) -> None:
    image = astronaut[:200, :200].copy()
    mask = np.zeros((200, 200), np.uint8)
    mask[60:140, 50:150] = 255
    out = deblur_condition(image, mask)
    inside = mask > 0
    assert np.array_equal(out[~inside], image[~inside])
    assert np.array_equal(out[inside], downsample_blur(image, 8)[inside])
    assert not np.array_equal(out[inside], image[inside])
    small = np.asarray(Image.fromarray(image).resize((8, 8), Image.LANCZOS).resize((200, 200), Image.LANCZOS))
    assert np.array_equal(downsample_blur(image, 8), small)


@pytest.fixture(scope="module")
def raw_faces(tmp_path_factory, hopper, astronaut) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    for name, photo, box in (("hopper", hopper, HOPPER_BOX), ("collins", astronaut, synth.ASTRONAUT_FACE_BOX)):
        (raw / name).mkdir()
        for i, image in enumerate(synth.face_variants(photo, box, 8, seed=len(name))):
            Image.fromarray(image).save(raw / name / f"{i:02d}.jpg", quality=92)
    (raw / "empty").mkdir()
    (raw / "single").mkdir()
    Image.fromarray(synth.face_variants(hopper, HOPPER_BOX, 1, seed=9)[0]).save(raw / "single" / "00.jpg")
    (raw / "hopper" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"junk" * 10)
    Image.fromarray(np.full((100, 100, 3), 128, np.uint8)).save(raw / "collins" / "noface.png")
    return raw


@pytest.fixture(scope="module")
def prepared(raw_faces: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    manifest = prepare_data(raw_faces, out, size=128, shard_size=6)
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert reasons["broken.jpg"].startswith("unreadable") and reasons["noface.png"] == "no face found"
    assert sum(s["count"] for s in manifest["shards"]) == 17
    from apple_video import weights

    parsed = weights.is_present("bisenet-parsing")
    assert manifest["mask_source"] == ("bisenet-parsing" if parsed else "landmark-hull")
    assert manifest["landmarks"] == "dlib-68"
    assert manifest["irises"] == ("mediapipe-iris-on-dlib-eyes" if weights.is_present("mediapipe-iris") and
                                  iris_runtime_available() else "estimated-from-eye-landmarks")
    assert manifest["framed"] == {"as-distributed": 0, "re-aligned": 17}  # photos, not aligned crops
    again = prepare_data(raw_faces, out, size=128, shard_size=6)  # resumable: nothing redone
    assert again["shards"] == manifest["shards"]
    return out


def _config(stage: str, **overrides):
    return load_train_config(ROOT / "configs" / "train" / f"tiny_{stage}.yaml", **overrides)


@pytest.fixture(scope="module")
def pipeline_run(prepared: Path, tmp_path_factory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("runs")
    teacher = train_teacher(_config("teacher", data=prepared, output=runs / "teacher", steps=12))
    assert len(teacher.history) == 12
    pseudo = make_pseudo_labels(load_train_config(ROOT / "configs" / "train" / "tiny_pseudo_labels.yaml", data=prepared,
                                                  output=runs / "pseudo", teacher_lora=runs / "teacher" / "default.safetensors"))
    student = train_student(_config("student", data=pseudo, output=runs / "student", steps=6,
                                    init_lora=runs / "teacher" / "default.safetensors"))
    assert len(student.history) == 6
    return {"teacher": runs / "teacher", "pseudo": pseudo, "student": runs / "student", "data": prepared}


def test_pipeline_outputs(pipeline_run) -> None:
    teacher, pseudo, student = pipeline_run["teacher"], pipeline_run["pseudo"], pipeline_run["student"]
    assert (teacher / "default.safetensors").is_file() and list((teacher / "samples").glob("*.png"))
    manifest = json.loads((pseudo / "manifest.json").read_text())
    shards = [{k: np.load(pseudo / name / f"{k}.npy") for k in ("pseudo", "target", "identity", "source_identity")}
              for name in manifest["shards"]]
    assert sum(len(s["pseudo"]) for s in shards) == 12
    for shard in shards:
        assert shard["pseudo"].shape[1:] == (128, 128, 3)
        assert all(a != b for a, b in zip(shard["identity"], shard["source_identity"], strict=True))
        assert not np.array_equal(shard["pseudo"], shard["target"])
    assert (student / "default.safetensors").is_file()


def test_student_starts_from_teacher(pipeline_run) -> None:
    cfg = _config("student", data=pipeline_run["pseudo"], output=pipeline_run["student"].parent / "student_fresh", steps=1,
                  init_lora=pipeline_run["teacher"] / "default.safetensors")
    from training.stages import StudentSampler

    trainer = Trainer(cfg, StudentSampler(cfg.data))
    from apple_video.models.lora import lora_state_dict

    ours = lora_state_dict(trainer.transformer)
    theirs = load_file(str(pipeline_run["teacher"] / "default.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_student_lora_loads_into_swap(pipeline_run, tmp_path: Path, source_photo: Path, astronaut: np.ndarray) -> None:
    target = tmp_path / "t.png"
    Image.fromarray(astronaut).save(target)
    result = subprocess.run([sys.executable, "-c", "from cli import main; main()", "swap", str(source_photo), str(target),
                             "-o", str(tmp_path / "o.png"), "--preset", "tiny", "--steps", "2", "--lora",
                             str(pipeline_run["student"] / "default.safetensors")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o.png").is_file()


def test_loss_goes_down_on_an_overfit_batch(prepared: Path, tmp_path: Path) -> None:
    cfg = _config("teacher", data=prepared, output=tmp_path, steps=40, drop_condition=0.0, drop_id=0.0, id_loss_start=10**6,
                  lr=1e-2)
    sampler = TeacherSampler(FaceData.load(prepared))
    fixed: Batch = sampler.batch(np.random.default_rng(0), 2)

    class Fixed:
        def batch(self, rng, size):
            return fixed

    trainer = Trainer(cfg, Fixed())
    trainer._generator = lambda step, micro: (np.random.default_rng(0), torch.Generator().manual_seed(0))
    trainer.train()
    losses = trainer.history
    # margin ~7% (1.03 against 1.11 when audited): the run is bit-exact for one install (seeded draws, the lock),
    # so the figure does not move between runs; the second assert (90% of steps go down) is the robust one
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 0.9 * (len(losses) - 1)


def test_kill_and_resume_continues_identically(prepared: Path, tmp_path: Path) -> None:
    args = ["train", "teacher", "--config", str(ROOT / "configs" / "train" / "tiny_teacher.yaml"), "--data", str(prepared)]
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-c", "from cli import main; main()", *args, "--output", str(reference),
                           "--steps", "20"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", "from cli import main; main()", *args, "--output", str(killed),
                                "--steps", "20"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoint-10" / "state.json").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed / "checkpoint-10").exists() and not (killed / "checkpoint-20").exists()
    shutil.rmtree(killed / "samples", ignore_errors=True)
    resumed = subprocess.run([sys.executable, "-c", "from cli import main; main()", *args, "--output", str(killed),
                              "--steps", "20"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr
    ref = json.loads((reference / "checkpoint-20" / "state.json").read_text())["losses"]
    got = json.loads((killed / "checkpoint-20" / "state.json").read_text())["losses"]
    assert len(ref) == len(got) == 20
    assert got == ref  # bit for bit: every draw (LoRA init, data, t, noise, drops) follows the config's seed
    final_ref, final_got = (load_file(str(run / "default.safetensors")) for run in (reference, killed))
    assert final_ref.keys() == final_got.keys() and all(torch.equal(final_ref[k], final_got[k]) for k in final_ref)


def test_two_runs_of_one_config_give_the_same_lora(prepared: Path, tmp_path: Path) -> None:
    """The fresh LoRA's init is drawn from the config's seed (not torch's global generator), so two Trainers of one
    config train the same LoRA bit for bit, whatever was drawn globally before; another seed gives another LoRA."""
    from apple_video.models.lora import lora_state_dict

    def run(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
        torch.manual_seed(len(name))  # a global draw in between must not matter
        torch.randn(7)
        trainer = train_teacher(_config("teacher", data=prepared, output=tmp_path / name, steps=3, seed=seed))
        return lora_state_dict(trainer.transformer)

    first, second, other = run("a"), run("bb"), run("c", seed=1)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["transformer.x_embedder.lora_A.weight"], other["transformer.x_embedder.lora_A.weight"])


def test_validation_loss_is_logged_plotted_and_deterministic(prepared: Path, tmp_path: Path) -> None:
    """A held-out identity, scored every `val_every` steps on fixed t and noise: logged beside the training loss in
    state.json, the same number for the same LoRA, refreshed in loss.png; the held-out person is never trained on."""
    cfg = _config("teacher", data=prepared, output=tmp_path / "v", steps=4, val_every=2, checkpoint_every=4, sample_every=100)
    trainer = train_teacher(cfg)
    steps = [s for s, _ in trainer.val_history]
    assert steps == [2, 4] and all(np.isfinite(v) for _, v in trainer.val_history)
    state = json.loads((cfg.output / "checkpoint-4" / "state.json").read_text())
    assert len(state["losses"]) == 4 and [tuple(v) for v in state["val"]] == trainer.val_history
    assert trainer.validation_loss() == trainer.val_history[-1][1]  # fixed inputs: the same LoRA scores the same
    assert Image.open(cfg.output / "loss.png").size[0] > 100
    held = {str(trainer.sampler.data.identities[item.key]) for item in trainer.val_sampler.batch(np.random.default_rng(0), 20).identity}
    trained = {str(trainer.sampler.data.identities[item.key]) for item in trainer.sampler.batch(np.random.default_rng(0), 50).identity}
    assert held and trained and not held & trained
    again = train_teacher(cfg.model_copy(update={"output": tmp_path / "w"}))
    assert again.val_history == trainer.val_history


def test_bad_data_sets(tmp_path: Path, raw_faces: Path, prepared: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from cli import main; main()", *args], cwd=ROOT, capture_output=True,
                              text=True)

    (tmp_path / "nothing").mkdir()
    result = cli("prepare-data", str(tmp_path / "nothing"), "-o", str(tmp_path / "o"), "--preset", "tiny")
    assert result.returncode == 2 and "no images found" in result.stderr
    one = tmp_path / "one"
    shutil.copytree(raw_faces / "collins", one / "collins")
    assert cli("prepare-data", str(one), "-o", str(tmp_path / "one_data"), "--preset", "tiny").returncode == 0
    result = cli("train", "pseudo-labels", "--config", str(ROOT / "configs/train/tiny_pseudo_labels.yaml"), "--data",
                 str(prepared), "--output", str(tmp_path / "p"), "--teacher-lora", str(tmp_path / "x.safetensors"))
    assert result.returncode == 2 and "LoRA file not found" in result.stderr
    fake_lora = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64)}, str(fake_lora))
    result = cli("train", "pseudo-labels", "--config", str(ROOT / "configs/train/tiny_pseudo_labels.yaml"), "--data",
                 str(tmp_path / "one_data"), "--output", str(tmp_path / "p"), "--teacher-lora", str(fake_lora))
    assert result.returncode == 2 and "at least two identities" in result.stderr
    singles = tmp_path / "singles"
    shutil.copytree(raw_faces / "single", singles / "single")
    assert cli("prepare-data", str(singles), "-o", str(tmp_path / "single_data"), "--preset", "tiny").returncode == 0
    result = cli("train", "teacher", "--config", str(ROOT / "configs/train/tiny_teacher.yaml"), "--data",
                 str(tmp_path / "single_data"), "--output", str(tmp_path / "t"), "--steps", "1")
    # as the official dataset: a person's identity image may be the target itself
    assert result.returncode == 0 and "its own identity image" in result.stderr, result.stderr
    result = cli("train", "teacher", "--config", str(ROOT / "configs/train/tiny_student.yaml"))
    assert result.returncode == 2 and "not 'teacher'" in result.stderr


def test_training_step_and_sample_grid_stay_on_the_device(prepared: Path, tmp_path: Path) -> None:
    """One loss + backward and the sample grid's sampling with the model on the `meta` device (see test_device.py):
    any tensor the loop builds on the host raises there, as it would on a GPU."""
    meta = torch.device("meta")
    trainer = Trainer(_config("teacher", data=prepared, output=tmp_path / "meta", steps=1), TeacherSampler(FaceData.load(prepared)))
    trainer.pipe.to(meta)
    trainer.arcface.to(meta)
    rng, gen = trainer._generator(0, 0)
    loss, stats = trainer.loss(trainer.sampler.batch(rng, 2), 0, rng, gen)  # step 0: before the id loss starts
    assert loss.device == meta and stats["mse"].device == meta
    loss.backward()
    trained = [p for p in trainer.transformer.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.device == meta for p in trained)
    batch, out = trainer.sample_latents(steps=2)
    assert out.device == meta and out.shape[0] == len(batch.target)
