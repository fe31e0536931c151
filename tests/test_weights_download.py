"""`weights download` against a local HTTP server on 127.0.0.1: the real client (urllib), Range resume after a
cut connection, size and sha256 refusals, the hub's LFS hash, a gated 401/403 answered in one line."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from apple_video import weights
from apple_video.errors import WeightsError

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """Serves `files` (path -> bytes); `cut` paths drop the connection half way the first time; `status` paths
    answer that code; `lfs` paths give the hub's X-Linked-Etag on a HEAD. Records each request's Range."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.status: dict[str, int] = {}
        self.lfs: dict[str, str] = {}
        self.ranges: list[tuple[str, str | None]] = []
        self.auth: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                if self.path in server.lfs:
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.send_header("X-Linked-Etag", f'"{server.lfs[self.path]}"')
                    self.end_headers()
                else:
                    self.send_response(404)
                    self.end_headers()

            def do_GET(self) -> None:
                server.ranges.append((self.path, self.headers.get("Range")))
                server.auth.append(self.headers.get("Authorization"))
                if self.path in server.status:
                    self.send_response(server.status[self.path])
                    self.end_headers()
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if self.path in server.cut:
                    server.cut.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch, tmp_path: Path):
    srv = Server()
    monkeypatch.setenv(weights.BASE_ENV, srv.base)
    monkeypatch.setenv("APPLE_VIDEO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", srv.base)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield srv
    srv.close()


def _entry(**kw) -> weights.WeightFile:
    return weights.WeightFile("test-file", "t/file.bin", purpose="test", source="url",
                              url="https://example.org/assets/file.bin", **kw)


def test_resume_after_a_cut_connection(server: Server, tmp_path: Path) -> None:
    server.files["/assets/file.bin"] = PAYLOAD
    server.cut.add("/assets/file.bin")
    target = tmp_path / "out" / "file.bin"
    weights.fetch(_entry(size=len(PAYLOAD), sha256=SHA), target, timeout=5)
    assert target.read_bytes() == PAYLOAD and not target.with_name("file.bin.part").exists()
    assert server.ranges[0] == ("/assets/file.bin", None)
    resumed = server.ranges[1][1]
    assert resumed is not None and 0 < int(resumed.removeprefix("bytes=").rstrip("-")) < len(PAYLOAD)


def test_a_part_file_left_by_an_earlier_run_is_resumed(server: Server, tmp_path: Path) -> None:
    server.files["/assets/file.bin"] = PAYLOAD
    target = tmp_path / "file.bin"
    target.with_name("file.bin.part").write_bytes(PAYLOAD[:1000])
    weights.fetch(_entry(size=len(PAYLOAD), sha256=SHA), target, timeout=5)
    assert target.read_bytes() == PAYLOAD and server.ranges == [("/assets/file.bin", "bytes=1000-")]


def test_wrong_hash_and_wrong_size_are_refused(server: Server, tmp_path: Path) -> None:
    server.files["/assets/file.bin"] = PAYLOAD
    with pytest.raises(WeightsError, match="sha256 .* not the published"):
        weights.fetch(_entry(size=len(PAYLOAD), sha256="0" * 64), tmp_path / "a.bin", timeout=5)
    with pytest.raises(WeightsError, match="bytes, the source publishes"):
        weights.fetch(_entry(size=len(PAYLOAD) + 1), tmp_path / "b.bin", timeout=5)
    with pytest.raises(WeightsError, match="not the published"):
        weights.fetch(_entry(sha256_prefix="ffffffff" if not SHA.startswith("ffffffff") else "00000000"),
                      tmp_path / "c.bin", timeout=5)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.part"))


def test_the_real_apple_entry_url_and_its_pinned_size(server: Server) -> None:
    """The catalogue's APPLE LoRA comes from the official repository's LFS object at the pinned commit; a file
    that is not the published one is refused and nothing is left in place."""
    entry = weights.lookup("apple-student")
    assert entry.url == ("https://media.githubusercontent.com/media/cvlab-kaist/APPLE/"
                         "23b30090549e88c38c2b6c47a3f2e38e2048f22a/checkpoints/student/default.safetensors")
    server.files[f"/media/cvlab-kaist/APPLE/{weights.APPLE_COMMIT}/checkpoints/student/default.safetensors"] = PAYLOAD
    with pytest.raises(WeightsError, match="463703368"):
        list(weights.download(["apple-student"], timeout=5))
    assert weights.status(entry)[0] == "missing"


def test_hub_file_checked_against_the_hubs_lfs_hash(server: Server) -> None:
    path = "/guozinan/PuLID/resolve/main/pulid_flux_v0.9.1.safetensors"
    payload = PAYLOAD * 4  # over the entry's 1 MB floor
    server.files[path] = payload
    server.lfs[path] = "1" * 64
    with pytest.raises(WeightsError, match="not the published 111111111111"):
        list(weights.download(["pulid-flux-v0.9.1"], timeout=5))
    server.lfs[path] = hashlib.sha256(payload).hexdigest()
    assert "downloaded pulid-flux-v0.9.1" in list(weights.download(["pulid-flux-v0.9.1"], timeout=5))[0]
    entry = weights.lookup("pulid-flux-v0.9.1")
    assert weights.status(entry, verify_hash=True)[0] == "present"
    placed = weights.weights_home() / entry.relpath
    placed.write_bytes(payload[:-1] + b"\0")  # same size, other bytes: only the hash sees it
    assert weights.status(entry)[0] == "present" and weights.status(entry, verify_hash=True)[0] == "corrupt"


@pytest.mark.parametrize("code", [401, 403])
def test_gated_answer_is_one_line_naming_the_token(server: Server, code: int, tmp_path: Path) -> None:
    server.status["/assets/file.bin"] = code
    with pytest.raises(WeightsError) as info:
        weights.fetch(_entry(), tmp_path / "g.bin", timeout=5)
    message = str(info.value)
    assert "\n" not in message and f"HTTP {code}" in message and "HF_TOKEN" in message and "huggingface-cli login" in message


def test_hub_token_is_sent_to_the_hub(server: Server, monkeypatch) -> None:
    path = "/guozinan/PuLID/resolve/main/pulid_flux_v0.9.1.safetensors"
    server.files[path] = PAYLOAD * 4
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    list(weights.download(["pulid-flux-v0.9.1"], timeout=5))
    assert server.auth == ["Bearer hf_test"]


def test_cli_download_gated_and_check_verify(server: Server, tmp_path: Path) -> None:
    server.status["/guozinan/PuLID/resolve/main/pulid_flux_v0.9.1.safetensors"] = 401
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "weights", "download", "pulid-flux-v0.9.1",
                             "--timeout", "5"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "HF_TOKEN" in result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "weights", "check", "--verify"], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "missing  apple-student" in result.stdout


def test_flux_snapshot_skips_the_single_file_checkpoint() -> None:
    repo_files = ["flux1-krea-dev.safetensors", "ae.safetensors", "README.md", "model_index.json",
                  "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
                  "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
                  "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                  "text_encoder_2/model-00001-of-00002.safetensors", "tokenizer/vocab.json",
                  "tokenizer_2/spiece.model", "scheduler/scheduler_config.json"]
    kept = weights.snapshot_files(weights.lookup("flux-krea-dev"), repo_files)
    assert "flux1-krea-dev.safetensors" not in kept and "ae.safetensors" not in kept and "README.md" not in kept
    assert set(kept) == set(repo_files) - {"flux1-krea-dev.safetensors", "ae.safetensors", "README.md"}


def test_every_entry_names_a_source_and_pins_what_is_published() -> None:
    for entry in weights.REGISTRY:
        assert entry.source != "none", entry.name
        assert entry.sha256 or entry.sha256_prefix or entry.hash_note, entry.name
        if entry.source == "github-lfs":
            assert entry.size and entry.sha256 and weights.APPLE_COMMIT in (entry.url or "")
