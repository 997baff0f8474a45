"""Models whose weights come from the network: ``keras:<Application>`` with ``--weights
imagenet`` reads Keras's cache (``~/.keras/models``, or ``$KERAS_HOME/models``) and
downloads what is missing. Everything else (the built-in model, files, directories) loads
offline. Offline, a download that fails says where the file goes instead."""

from __future__ import annotations

import os
import re
from pathlib import Path

from batchserve.errors import ModelLoadError

#: The URL in Keras's "URL fetch failure on <url>: ..." (and its other download errors).
_URL = re.compile(r"(https?://[^\s:]+(?::\d+)?[^\s:]*)")


def keras_cache() -> Path:
    """Where Keras looks for downloaded weights before fetching them."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def build_error(source: str, weights: str, error: Exception) -> ModelLoadError:
    """The error to give when building ``source`` with ``weights`` failed with ``error``:
    when it was a download, the ways forward offline; else what Keras said."""
    text = str(error)
    found = _URL.search(text)
    downloading = found is not None or "fetch" in text.lower() or "urlopen" in text.lower()
    if weights != "imagenet" or not downloading:
        return ModelLoadError(f"cannot build {source} with weights={weights}: {text}")
    url = found.group(1) if found else "Keras's published weights"
    file = url.rsplit("/", 1)[-1] if found else "its weights file"
    return ModelLoadError(
        f"{source} needs its ImageNet weights, {file}, and they could not be downloaded "
        f"({text.splitlines()[0][:200]}). Offline: fetch {url} elsewhere and pass "
        f"--weights PATH, or put it in {keras_cache()}/; or serve --model builtin "
        "(shipped, no network), or --weights none (random weights)"
    )
