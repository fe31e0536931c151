"""`apple-video weights download`: fetch model files from the Hugging Face hub, failing fast when offline."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

from apple_video.errors import UserError, WeightsError
from apple_video.models import registry

logger = logging.getLogger(__name__)


def hub_reachable(timeout: float) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def download(names: list[str], timeout: float = 10.0) -> Iterator[str]:
    """Download each named file (all downloadable ones when `names` is empty) into the weights home."""
    entries = [registry.lookup(n) for n in names] if names else [e for e in registry.REGISTRY if e.repo]
    todo = [e for e in entries if registry.status(e)[0] != "present"]
    if not todo:
        yield "all requested model files are present"
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable(timeout):
        raise UserError(f"cannot reach the Hugging Face hub within {timeout:.0f}s (offline?); copy the files by hand: "
                        "`apple-video weights where` lists where each one goes")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    for entry in todo:
        if entry.repo is None:
            yield f"skipped {entry.name}: no hub source known ({entry.purpose})"
            continue
        target = registry.weights_home() / entry.relpath
        try:
            if entry.is_dir:
                snapshot_download(entry.repo, local_dir=str(target))
            else:
                hf_hub_download(entry.repo, entry.repo_file, local_dir=str(target.parent / ".hub"))
                fetched = target.parent / ".hub" / entry.repo_file
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(fetched, target)
        except GatedRepoError:
            raise WeightsError(f"{entry.repo} is gated: accept its licence on huggingface.co and set HF_TOKEN") from None
        except HfHubHTTPError as error:
            raise WeightsError(f"download of {entry.name} failed: {error}") from None
        yield f"downloaded {entry.name} -> {target}"
