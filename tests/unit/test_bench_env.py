"""bench/run.py: the environment its raw runs and services get, pinned or not."""

from __future__ import annotations

import argparse

from bench.run import _env, unpin


def test_no_pin_drops_binding_inherited_from_the_shell(monkeypatch) -> None:
    """`--no-pin` is the unpinned side of the A/B: an OMP_PROC_BIND set in the shell still bound
    every thread, the raw runs' and the workers' alike."""
    monkeypatch.setenv("OMP_PROC_BIND", "close")
    monkeypatch.setenv("OMP_PLACES", "threads")
    unpinned = _env(argparse.Namespace(pin=False, device="cpu"))
    assert "OMP_PROC_BIND" not in unpinned and "OMP_PLACES" not in unpinned
    assert unpinned["HF_HUB_OFFLINE"] == "1"
    pinned = _env(argparse.Namespace(pin=True, device="cpu"))
    assert (pinned["OMP_PROC_BIND"], pinned["OMP_PLACES"]) == ("close", "threads")  # the shell's own choice
    monkeypatch.delenv("OMP_PROC_BIND")
    monkeypatch.delenv("OMP_PLACES")
    pinned = _env(argparse.Namespace(pin=True, device="cpu"))
    assert (pinned["OMP_PROC_BIND"], pinned["OMP_PLACES"]) == ("true", "cores")
    assert "OMP_PROC_BIND" not in _env(argparse.Namespace(pin=True, device="cuda"))
    service = {"OMP_PROC_BIND": "true", "OMP_PLACES": "cores", "IMAGEGEN_PIN_THREADS": "false"}
    assert unpin(service, False) == {"IMAGEGEN_PIN_THREADS": "false"} and unpin(service, True) == service
