"""The shipped tiny-shapes model: its tokenizer's known limitation stays as models/TRAINING.md states
it, and the service refuses sizes the model cannot draw (above 64 px) with a 422."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import shapes
from models.clip import TRAIN_LEN
from models.tokenizer import WORDS, build_clip_tokenizer
from tests.procs import RedisServer

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "weights" / "tiny-shapes"
# What TRAINING.md and models/tokenizer.py say about the tokenizer the shipped model was trained with.
SPLIT_WORDS = {
    "green": ["g", "re", "e", "n</w>"],
    "background": ["back", "gr", "o", "u", "n", "d</w>"],
    "image": ["i", "mag", "e</w>"],
    "small": ["s", "ma", "l", "l</w>"],
    "centered": ["cente", "red</w>"],
    "bottom": ["bot", "to", "m</w>"],
    "squares": ["squa", "re", "s</w>"],
    "drawing": ["dra", "wi", "n", "g</w>"],
    "plain": ["p", "la", "in</w>"],
    "colored": ["colo", "red</w>"],
}


def caption_ids(tokenizer, combos: list[shapes.Combo]) -> list[list[int]]:
    return [tokenizer(c.caption(t)).input_ids for c in combos for t in range(len(shapes.TEMPLATES))]


def test_the_shipped_tokenizer_is_the_one_the_builder_makes() -> None:
    """The documented reproduce command rebuilds it: changing the builder changes the model."""
    from transformers import CLIPTokenizer

    shipped, built = CLIPTokenizer.from_pretrained(str(MODEL_DIR / "tokenizer")), build_clip_tokenizer()
    assert shipped.get_vocab() == built.get_vocab()
    assert caption_ids(shipped, shapes.all_combos()) == caption_ids(built, shapes.all_combos())
    for word in WORDS:
        assert shipped.tokenize(word) == built.tokenize(word)


def test_the_tokenizer_limitation_is_as_documented() -> None:
    tokenizer = build_clip_tokenizer()
    assert len(WORDS) == 49
    assert {w: tokenizer.tokenize(w) for w in WORDS if len(tokenizer.tokenize(w)) > 1} == SPLIT_WORDS
    lengths = [len(ids) for ids in caption_ids(tokenizer, shapes.all_combos())]
    assert (min(lengths), max(lengths)) == (12, 20)  # with BOS and EOS
    # The CLIP stage truncates to TRAIN_LEN: 179 of the 576 training captions lose the tail of
    # "background", never a colour or shape word.
    train = [(c, t) for c in shapes.train_combos() for t in range(len(shapes.TEMPLATES))]
    cut = 0
    for combo, template in train:
        full = tokenizer(combo.caption(template)).input_ids
        kept = tokenizer(combo.caption(template), max_length=TRAIN_LEN, truncation=True).input_ids
        if len(full) > TRAIN_LEN:
            cut += 1
            assert kept[-1] == tokenizer.eos_token_id
            assert {combo.fg, combo.bg, combo.shape} <= set(tokenizer.decode(kept[1:-1]).split())
            assert "".join(tokenizer.convert_ids_to_tokens(full[len(kept) - 1 : -1])) in {"ound</w>", "d</w>"}
    assert (TRAIN_LEN, len(train), cut) == (16, 576, 179)


def test_tiny_shapes_refuses_sizes_above_64_with_a_422(redis_db, redis_server: RedisServer) -> None:
    """Trained at 32 px, it accepted up to 256 px (8 × native) and drew scattered blobs from 128 px."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.core.jobs import MODELS_KEY, GenerationParams
    from app.main import create_app
    from worker.runtime import DiffusersRuntime, check_size

    runtime = DiffusersRuntime.load(Settings(model="tiny-shapes"))
    info = runtime.info
    assert (info.width, info.height, info.max_width, info.max_height) == (32, 32, 64, 64)
    with pytest.raises(ValueError, match="width: must be at most 64 for model tiny-shapes"):
        check_size(info, GenerationParams(prompt="x", width=72, height=32))  # a job from another producer
    redis_db.hset(MODELS_KEY, "tiny-shapes", info.model_dump_json())  # what its worker publishes
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", model="tiny-shapes")
    with TestClient(create_app(settings)) as http:
        refused = http.post("/generate", json={"prompt": "a red circle on a blue background", "height": 128})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["message"] == "height: must be at most 64 for model tiny-shapes"
        assert error["details"][0]["loc"] == ["body", "height"]
        taken = http.post("/generate", json={"prompt": "a red circle on a blue background", "width": 64, "height": 64})
        assert taken.status_code == 202, taken.text
