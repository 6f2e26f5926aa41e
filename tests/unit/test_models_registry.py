"""models.registry: offline, a mistyped name gets a clear error; a model built in code is rebuilt when
the code that builds it changed (the cache is keyed by name only); tiny-random builds quietly."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

from models import registry
from models.registry import REGISTRY, resolve


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, with an empty Hugging Face cache of our own; returns the cache folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_offline_a_mistyped_name_is_refused_with_the_known_names(offline: Path) -> None:
    """It went to diffusers as a hub id: "tiny-shapez does not appear to have a file named
    model_index.json"."""
    with pytest.raises(FileNotFoundError) as info:
        resolve("tiny-shapez")
    message = str(info.value)
    assert "'tiny-shapez' is not a registry name" in message and "HF_HUB_OFFLINE" in message
    assert all(name in message for name in REGISTRY) and "\n" not in message  # the worker logs one line
    with pytest.raises(FileNotFoundError, match="not a registry name"):
        resolve("someone/some-model")


def test_offline_folders_cached_hub_ids_and_other_paths_still_pass(offline: Path, tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve(str(folder)) == str(folder)
    # A hub id whose pipeline is in the cache loads offline.
    snapshot = offline / "models--someone--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (offline / "models--someone--cached" / "refs").mkdir()
    (offline / "models--someone--cached" / "refs" / "main").write_text("abc123")
    assert resolve("someone/cached") == "someone/cached"
    # Not a hub id at all: diffusers' own error ("neither a valid local path nor a valid repo id") says it.
    assert resolve("/no/such/folder") == "/no/such/folder"


def test_online_unknown_names_go_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve("someone/some-model") == "someone/some-model"


BUILDER = """
from pathlib import Path

VERSION = {version}


def build(out):
    Path(out, "model_index.json").write_text("{{}}")
    Path(out, "version.txt").write_text(str(VERSION))
"""


def test_a_built_model_is_rebuilt_when_its_builder_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder in IMAGEGEN_MODEL_CACHE was served as long as it had a model_index.json, however old
    the code that built it."""
    source = tmp_path / "src" / "stamped_builder.py"
    source.parent.mkdir()
    monkeypatch.syspath_prepend(str(source.parent))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    cache = tmp_path / "cache"
    monkeypatch.setattr(registry, "CACHE", cache)
    entry = registry.ModelEntry("stamped", "test", builder="stamped_builder:build")
    monkeypatch.setitem(registry.REGISTRY, "stamped", entry)

    def load(version: int) -> None:  # a new process running new code
        source.write_text(BUILDER.format(version=version))
        monkeypatch.delitem(sys.modules, "stamped_builder", raising=False)

    load(1)
    out = Path(resolve("stamped"))
    assert (out / "version.txt").read_text() == "1"
    built = (out / "version.txt").stat().st_mtime_ns
    assert resolve("stamped") == str(out) and (out / "version.txt").stat().st_mtime_ns == built  # not rebuilt
    load(2)
    assert resolve("stamped") == str(out)
    assert (out / "version.txt").read_text() == "2"
    # A folder built before stamps existed counts as stale too.
    (out / registry.STAMP_FILE).unlink()
    (out / "version.txt").write_text("old")
    resolve("stamped")
    assert (out / "version.txt").read_text() == "2"
    assert [p.name for p in cache.iterdir()] == ["stamped"]  # no old or half-built copy left


def test_tiny_random_builds_without_the_steps_offset_warning(tmp_path: Path) -> None:
    """diffusers warned (FutureWarning) and rewrote steps_offset to 1 at every build; the saved
    config, and so every image, was already the one with steps_offset 1."""
    from models.tiny import build_tiny_random

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_tiny_random(tmp_path / "tiny")
    assert not [w for w in caught if "steps_offset" in str(w.message)]
    config = json.loads((tmp_path / "tiny" / "scheduler" / "scheduler_config.json").read_text())
    assert config["steps_offset"] == 1
