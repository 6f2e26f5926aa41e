"""The `models.train` / `models.evaluate` command lines: options are checked before any work, and a
training run never overwrites a model unless asked to (--force), nor leaves a half-written one.

Nothing here writes under models/weights: every run goes to tmp_path, and the shipped folder is
only ever checked by pure functions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from models import evaluate, train

TINY = ["--clip-steps", "1", "--steps", "1", "--batch", "2", "--threads", "1", "--minutes", "0"]


@pytest.fixture(autouse=True)
def _offline_and_threads(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # main() sets the process-wide thread count


def exit_code(capsys: pytest.CaptureFixture[str], main, argv: list[str]) -> tuple[int | str | None, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return info.value.code, err


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def fake_model(folder: Path) -> Path:
    """A folder that looks like a trained model with evaluation output beside it."""
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}\n')
    (folder / "imagegen.json").write_text(json.dumps(train.DEFAULTS) + "\n")
    (folder / "unet" / "weights.bin").write_bytes(b"old weights")
    (folder / "train.log").write_text("OLD RUN LOG\n")
    (folder / "eval_metrics.json").write_text('{"stale": true}\n')
    (folder / "samples.png").write_bytes(b"stale grid")
    return folder


def no_training(*args, **kwargs):
    raise AssertionError("training started although the options were bad")


# ---------------------------------------------------------------- models.train: option checks


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--threads", "0"], "--threads"),
        (["--batch", "0"], "--batch"),
        (["--lr", "-5"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--steps", "-3", "--clip-steps", "-1"], "--steps"),
        (["--clip-steps", "0"], "--clip-steps"),
        (["--steps", "many"], "--steps"),
        (["--minutes", "-1"], "--minutes"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_train_rejects_bad_options_before_any_work(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.setattr(train, "train_clip", no_training)
    out = tmp_path / "out"
    code, err = exit_code(capsys, train.main, ["--out", str(out), *argv])
    assert code == 2
    assert f"argument {needle}" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_train_out_under_a_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "train_clip", no_training)
    (tmp_path / "afile").write_text("x")
    code, err = exit_code(capsys, train.main, ["--out", str(tmp_path / "afile" / "model")])
    assert code == 2
    assert "--out" in err and "is a file, not a folder" in err
    code, err = exit_code(capsys, train.main, ["--out", str(tmp_path / "afile")])
    assert code == 2 and "is not a folder" in err


def test_train_refuses_a_non_empty_out_without_force(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "train_clip", no_training)
    out = fake_model(tmp_path / "model")
    before = snapshot(out)
    code, err = exit_code(capsys, train.main, ["--out", str(out)])
    assert code == 2
    assert "--force" in err and "--out" in err and str(out) in err
    assert snapshot(out) == before  # train.log not truncated, nothing added
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_force_still_refuses_a_folder_that_is_no_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "train_clip", no_training)
    (tmp_path / "notes.txt").write_text("mine")
    code, err = exit_code(capsys, train.main, ["--out", str(tmp_path), "--force"])
    assert code == 2 and "not a model folder" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_shipped_model_is_not_the_default_and_needs_force():
    assert train.DEFAULT_OUT != train.SHIPPED
    assert train.SHIPPED.parent not in train.DEFAULT_OUT.parents and train.DEFAULT_OUT.parent != train.SHIPPED.parent
    assert (train.SHIPPED / "model_index.json").is_file()
    with pytest.raises(ValueError, match="--force"):
        train.check_out(train.SHIPPED, force=False)
    assert train.check_out(train.SHIPPED, force=True) == train.SHIPPED  # pure check: writes nothing


def test_empty_or_missing_out_needs_no_force(tmp_path):
    (tmp_path / "empty").mkdir()
    assert train.check_out(tmp_path / "empty", force=False) == tmp_path / "empty"
    assert train.check_out(tmp_path / "a" / "b", force=False) == tmp_path / "a" / "b"


def test_quick_sets_defaults_but_explicit_step_counts_win(tmp_path):
    out = ["--out", str(tmp_path / "o")]
    args = train.parse_args(out)
    assert (args.clip_steps, args.steps) == (600, 7000)
    args = train.parse_args([*out, "--quick"])
    assert (args.clip_steps, args.steps) == (100, 150)
    args = train.parse_args([*out, "--quick", "--steps", "5"])
    assert (args.clip_steps, args.steps) == (100, 5)
    args = train.parse_args([*out, "--clip-steps", "7", "--quick"])
    assert (args.clip_steps, args.steps) == (7, 150)


# ---------------------------------------------------------------- models.train: the output folder


def test_an_interrupted_run_leaves_the_existing_model_untouched(tmp_path, monkeypatch, capsys):
    out = fake_model(tmp_path / "model")
    before = snapshot(out)

    def interrupted_clip(steps, seed, log):
        log("clip step 0 loss 5.0")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_clip", interrupted_clip)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--out", str(out), "--force", *TINY])
    assert "was left as it was" in capsys.readouterr().err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the partial folder is gone


def test_a_failed_swap_puts_the_old_model_back(tmp_path, monkeypatch):
    out = fake_model(tmp_path / "model")
    before = snapshot(out)
    work = tmp_path / "model.partial-x"
    work.mkdir()
    (work / "model_index.json").write_text("{}")
    real_rename = Path.rename

    def rename(self, target):
        if self == work:
            raise OSError("disk trouble")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk trouble"):
        train.finish_out(work, out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.partial-x"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A real (useless) model from a one-step run into a folder that did not exist yet."""
    out = tmp_path_factory.mktemp("tiny") / "models" / "tiny-shapes"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        train.main(["--out", str(out), *TINY])
    torch.set_num_threads(threads)
    return out


def test_a_tiny_run_writes_a_complete_model(tiny_model):
    for name in ("model_index.json", "imagegen.json", "train.log", "train_log.csv", "train_metrics.json"):
        assert (tiny_model / name).is_file(), name
    assert json.loads((tiny_model / "train_metrics.json").read_text())["decoder_steps_done"] == 1
    assert [p.name for p in tiny_model.parent.iterdir()] == ["tiny-shapes"]  # no partial folder left


def test_force_replaces_the_whole_folder(tiny_model, tmp_path):
    out = tmp_path / "tiny-shapes"
    shutil.copytree(tiny_model, out)
    (out / "eval_metrics.json").write_text('{"stale": true}\n')
    (out / "samples.png").write_bytes(b"stale grid")
    (out / "train.log").write_text("OLD RUN LOG\n")
    train.main(["--out", str(out), "--force", "--seed", "1", *TINY])
    assert not (out / "eval_metrics.json").exists() and not (out / "samples.png").exists()
    assert "OLD RUN LOG" not in (out / "train.log").read_text()
    assert "'seed': 1" in (out / "train.log").read_text()
    assert (out / "model_index.json").is_file() and (out / "unet").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-shapes"]  # no partial or old folder left


# ---------------------------------------------------------------- models.evaluate


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--scheduler", "bogus"], "argument --scheduler: invalid choice"),
        (["--threads", "0"], "argument --threads"),
        (["--per-held", "0", "--per-seen", "0"], "nothing to evaluate"),
        (["--per-held", "-1"], "argument --per-held"),
        (["--json", "/nonexistent/x.json"], "--json /nonexistent/x.json: folder /nonexistent does not exist"),
        (["--json", "."], "--json . is a folder"),
        (["--grid", "/nonexistent/g.png"], "--grid /nonexistent/g.png"),
        (["--steps", "0"], "argument --steps"),
        (["--guidance", "-1"], "argument --guidance"),
        (["--seed", "-2"], "argument --seed"),
    ],
)
def test_evaluate_rejects_bad_options_before_loading(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.setattr(evaluate, "evaluate", no_training)
    model = fake_model(tmp_path / "model")
    code, err = exit_code(capsys, evaluate.main, ["--model", str(model), "--grid", str(tmp_path / "g.png"), *argv])
    assert code == 2
    assert needle in err


@pytest.mark.parametrize("missing", ["folder", "imagegen.json", "model_index.json"])
def test_evaluate_needs_a_model_folder(tmp_path, monkeypatch, capsys, missing):
    monkeypatch.setattr(evaluate, "evaluate", no_training)
    model = fake_model(tmp_path / "model")
    if missing == "folder":
        model = tmp_path / "nonexistent"
    else:
        (model / missing).unlink()
    code, err = exit_code(capsys, evaluate.main, ["--model", str(model)])
    assert code == 2
    assert f"--model {model}" in err and (missing == "folder" or missing in err)


def test_evaluate_scheduler_choices_are_the_service_schedulers():
    from app.core.jobs import Scheduler

    for s in Scheduler:
        if s is Scheduler.native:  # the saved one: evaluate keeps it
            folder = Path(evaluate.__file__).parent / "weights" / "tiny-shapes"
            saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
            assert type(evaluate.load_pipeline(folder, s.value).scheduler).__name__ == saved
            continue
        assert train.make_scheduler(s.value).config.prediction_type == "v_prediction"


def test_evaluate_a_tiny_model(tiny_model, tmp_path, capsys):
    before = snapshot(tiny_model)
    metrics, grid = tmp_path / "m.json", tmp_path / "g.png"
    argv = ["--model", str(tiny_model), "--per-held", "1", "--per-seen", "0", "--steps", "2", "--no-speed"]
    evaluate.main([*argv, "--scheduler", "pndm", "--json", str(metrics), "--grid", str(grid)])
    res = json.loads(metrics.read_text())
    assert res["settings"] == {"num_inference_steps": 2, "guidance_scale": 4.0, "scheduler": "pndm"}
    assert res["held_out"]["n"] == 24 and "seen" not in res
    assert grid.stat().st_size > 0
    assert snapshot(tiny_model) == before
    assert set(os.listdir(tmp_path)) == {"g.png", "m.json"}


def test_evaluate_writes_no_grid_unless_asked(tmp_path, monkeypatch, capsys):
    """`--grid` defaulted to MODEL/samples.png, so evaluating the shipped model as documented rewrote
    the tracked models/weights/tiny-shapes/samples.png."""
    model = fake_model(tmp_path / "model")
    seen: dict[str, object] = {}
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: seen.update(grid=args[8]) or {})
    evaluate.main(["--model", str(model)])
    assert seen["grid"] is None
    evaluate.main(["--model", str(model), "--grid", str(tmp_path / "g.png")])
    assert seen["grid"] == tmp_path / "g.png"
    assert evaluate.parse_args([]).grid is None  # the shipped model, as TRAINING.md runs it


def test_every_train_option_has_help(capsys):
    ap = getattr(train, "build_parser", None)
    actions = ap()._actions if ap else []  # before: no parser to inspect, and --lr/--threads/--seed had no help
    assert {a.dest for a in actions} >= {"out", "lr", "threads", "seed", "minutes"}
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
    threads = next(a.help for a in actions if a.dest == "threads")
    assert "the most" in threads and "thread picker" in threads


def tiny_text_encoder():
    from models.clip import build_text_encoder
    from models.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(0)
    return build_text_encoder(tokenizer).requires_grad_(False), tokenizer


def test_decoder_loss_averages_hold_decoder_losses_only():
    """The first "loss(avg50)" lines of the decoder averaged in the CLIP stage's last losses (they
    share `rows`, which becomes train_log.csv)."""
    text_encoder, tokenizer = tiny_text_encoder()
    rows = [{"stage": "clip", "step": i, "loss": 1000.0, "lr": 0.0, "time_s": 0.0} for i in range(60)]
    lines: list[str] = []
    torch.set_num_threads(1)
    train.train_decoder(text_encoder, tokenizer, 2, 2, 1e-3, 0, 0, lines.append, rows)
    decoder = [r["loss"] for r in rows if r["stage"] == "decoder"]
    assert len(rows) == 62 and len(decoder) == 2  # train_log.csv still gets both stages
    logged = [line for line in lines if line.startswith("decoder step")]
    assert [line.split()[2] for line in logged] == ["0", "1"]
    assert float(logged[0].split()[4]) == pytest.approx(decoder[0], abs=1e-4)
    assert float(logged[1].split()[4]) == pytest.approx(sum(decoder) / 2, abs=1e-4)


def test_a_run_cut_short_by_the_time_budget_warns(tmp_path, monkeypatch, capsys):
    """A --minutes budget that ran out only said "time budget reached" in one log line."""
    real = train.train_decoder

    def out_of_time(text_encoder, tokenizer, steps, batch, lr, minutes, seed, log, rows):
        return real(text_encoder, tokenizer, steps, batch, lr, 1e-9, seed, log, rows)  # ~60 ns of budget

    monkeypatch.setattr(train, "train_decoder", out_of_time)
    out = tmp_path / "short"
    train.main(["--out", str(out), *TINY[:-2], "--steps", "3", "--minutes", "30"])
    printed = capsys.readouterr().out
    log = (out / "train.log").read_text()
    for text in (printed, log):
        assert "WARNING: the --minutes time budget ran out at decoder step 0 of 3 planned" in text
        assert "WARNING: only 0 of 3 decoder steps were trained" in text and "--minutes 0" in text
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert (metrics["decoder_steps_done"], metrics["decoder_steps_planned"]) == (0, 3)
