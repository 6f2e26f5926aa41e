"""A deterministic CLIP BPE tokenizer built in code (no download, same files on every machine).

CLIP's BPE works on byte-level characters with `</w>` marking the end of a word. We build the
vocabulary from the 256 byte characters (plain and word-final) plus left-to-right merges for a
fixed word list; anything else still encodes character by character. Merges are derived left to
right per word, deduplicated in first-seen order.

Known limitation (kept because the shipped tiny-shapes model was trained with exactly this
tokenizer): NOT every listed word is one token. BPE applies merges by rank, and a merge that an
earlier word added can fire before the next merge of this word's left-to-right chain, and the
chain is then stuck: in "green", `r e` (rank 0, from "red") fires before `g r`; in
"background", `g r` (from "green") fires before `back g`. 10 of the 49 words split:
"green" → `g re e n</w>`, "background" → `back gr o u n d</w>`, "image" → `i mag e</w>`, and
small, centered, bottom, squares, drawing, plain, colored ("centered" and "colored" end in the
token `red</w>` of "red"). A rebuilt vocabulary should add, for each word, the merges that encoding it
with the merges so far actually needs, until every word is one token (with a test that checks
it); that changes the token ids, so it needs a retrain.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "black", "orange", "purple", "gray")
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "star")
WORDS = (
    *COLOURS,
    *SHAPES,
    "a",
    "an",
    "the",
    "on",
    "in",
    "with",
    "of",
    "and",
    "background",
    "image",
    "picture",
    "photo",
    "shape",
    "small",
    "large",
    "big",
    "centered",
    "left",
    "right",
    "top",
    "bottom",
    "over",
    "circles",
    "squares",
    "triangles",
    "drawing",
    "painting",
    "dot",
    "box",
    "plain",
    "colored",
)


@lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    """GPT-2/CLIP's reversible byte → printable unicode character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def vocab_and_merges(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab, merges) for a CLIP BPE over `words`; deterministic for a given word list."""
    chars = _byte_chars()
    tokens: list[str] = list(chars) + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        # Merge left to right: ((a b) c) ... so each word needs len(word)-1 merges.
        current = symbols[0]
        for nxt in symbols[1:]:
            merged = current + nxt
            rule = (current, nxt)
            if merged not in seen:
                seen.add(merged)
                tokens.append(merged)
                merges.append(rule)
            elif rule not in merges:
                merges.append(rule)
            current = merged
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(words: tuple[str, ...] = WORDS) -> CLIPTokenizer:
    """A ready CLIPTokenizer (padding to 77 tokens, like the real CLIP)."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges(words)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=MAX_LENGTH,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )
