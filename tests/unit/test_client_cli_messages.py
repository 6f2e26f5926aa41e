"""What the `imagegen` command says on Ctrl-C (true to the server's answer to the cancel) and for
`-o -`; against a scripted server (httpx.MockTransport)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegen_client import Client, cli

PNG = b"\x89PNG\r\n\x1a\nfake"


def _view(job_id: str, status: str) -> dict[str, Any]:
    images = [{"index": 0, "url": "", "seed": 1, "width": 8, "height": 8}] if status == "succeeded" else []
    return {"id": job_id, "status": status, "params": {}, "progress": {"step": 1, "total": 4}, "images": images}


@pytest.mark.parametrize(
    ("answer", "says", "code", "saved"),
    [
        ((200, "canceled"), "interrupted; canceled job", 130, False),  # it was queued
        ((202, "running"), "asked job {id} to cancel (it stops at its next step)", 130, False),
        ((409, "succeeded"), "interrupted, but job {id} had already succeeded", 0, True),
        ((409, "failed"), "interrupted, but job {id} had already failed", 130, False),
    ],
)
def test_ctrl_c_says_what_the_cancel_did(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    answer: tuple[int, str],
    says: str,
    code: int,
    saved: bool,
) -> None:
    """It printed "canceled job X" for a running job that only stops at its next step (202), and
    "goes on running" for a job that had just finished (409)."""
    job_id = str(uuid.uuid4())
    status, state = answer

    def server(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=_view(job_id, "queued"))
        if request.method == "DELETE":
            if status == 409:
                body = {"error": {"code": "job_finished", "message": f"job {job_id} already ended {state}"}}
                return httpx.Response(409, json=body)
            return httpx.Response(status, json=_view(job_id, state))
        if request.url.path.endswith("/images/0"):
            return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})
        return httpx.Response(200, json=_view(job_id, state))

    class Interrupted(Client):
        def __init__(self, base_url: str | None = None, *, api_key: str | None = None) -> None:
            super().__init__(base_url, api_key=api_key, transport=httpx.MockTransport(server))

        def wait(self, *args: Any, **kwargs: Any) -> Any:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "Client", Interrupted)
    assert cli.main(["--url", "http://scripted", "generate", "x", "-q", "-o", str(tmp_path / "out")]) == code
    out, err = capsys.readouterr()
    assert says.format(id=job_id) in err, err
    assert "goes on running" not in err
    png = tmp_path / "out" / f"{job_id}-0.png"
    assert png.exists() == saved and (out.strip() == str(png)) == saved


def test_output_dash_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o -` made a folder named `-`; now exit 2 before any job is submitted."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["--url", "http://127.0.0.1:9", "generate", "x", "-o", "-"])
    assert info.value.code == 2
    assert "-o -" in capsys.readouterr().err
    assert not (tmp_path / "-").exists()
