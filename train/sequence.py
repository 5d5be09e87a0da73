"""A token sample -> one training sequence: prompts, `<boi>`/`<eoi>`, tiles and thumbnail, CFG drop, loss masks.

Layouts are those of `model.special_tokens`, wrapped in the template of `model.template` (START, TURN, END:
`<s>`, nothing, `</s>` for the raw template; the chat template's user/assistant markers for "chat"):
  und: START [<tile>? <boi> IMG*n <eoi>]* [<thumbnail> <boi> IMG*n <eoi>] PROMPT_UND TURN caption END
  gen: START PROMPT_GEN caption TURN <boi> IMG*n <eoi> END      (or PROMPT_UNCOND instead of prompt + caption)
Text targets: und -> caption and END; gen -> `<eoi>` and END. Code targets: gen image positions.
Generation prompts (`understanding_prompt`, `generation_prompt`) are these very sequences cut where the
model's answer starts, built by the same `write_sequence`.

Which images a sample contributes (the rule for tiles and for samples longer than the sequence):
  1. one tile: that image, no markers;
  2. tiles <= the stage's max_tiles: every tile with `<tile>`, then the thumbnail if the stage wants one;
  3. otherwise, or if (2) does not fit the sequence length: the thumbnail alone (the whole image);
  4. still too long, or no thumbnail to fall back to: the sample is dropped and counted. An image is
     never truncated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from model.folding import Fold
from model.template import LayoutIds
from pipeline.token_shards import TokenSample
from synergen.errors import ShardError

__all__ = ["IGNORE", "LayoutIds", "SequenceSpec", "Sequence", "Layout", "plan_lengths", "plan_layout", "layout_of",
           "build_sequence", "write_sequence", "understanding_prompt", "generation_prompt"]

IGNORE = -100  # label of positions that are not text targets (transformers convention)


@dataclass(frozen=True)
class SequenceSpec:
    """The stage's sequence settings (from the mixture manifest) plus the model's fold."""

    seq_len: int
    max_tiles: int
    thumbnail: bool
    fold: Fold


@dataclass
class Sequence:
    """One document of a packed row."""

    input_ids: np.ndarray  # [L] int64; <img> at image positions
    labels: np.ndarray  # [L] int64; text targets, IGNORE elsewhere
    image_mask: np.ndarray  # [L] bool
    image_targets: np.ndarray  # [L] bool; code targets (generation images)
    codes: np.ndarray  # [N_img, fh*fw] int64; one row per True of image_mask, in order
    source: str = ""
    key: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class Layout:
    """Which images of a sample go in, and how they are marked: "single", "tiles" or "tiles+thumbnail"."""

    images: tuple[int, ...]
    kind: str
    length: int


# What the layout rule needs of a sample, as rows of `pipeline.token_shards` index (one row per sample): the
# planner decides every sample's layout from these rows alone, without decoding the sample.
VIEW_DROPPED, VIEW_FIRST, VIEW_THUMBNAIL = 0, 1, 2


def sample_facts(sample: TokenSample) -> np.ndarray:
    """A decoded sample as a one-row index (the fields `plan_lengths` reads)."""
    from pipeline.token_shards import facts_row, index_rows

    return index_rows([facts_row(sample.key, 0, 0, 0, list(sample.codes.shape), int(sample.text_ids.size), sample.meta)])


def plan_lengths(facts: np.ndarray, task: str, uncond: np.ndarray, spec: SequenceSpec, ids: LayoutIds) -> tuple[np.ndarray, np.ndarray]:
    """The layout rule of the module docstring over index rows: (length [N] int64, view [N] int8; VIEW_DROPPED = 0).

    VIEW_FIRST is the first candidate (gen: the last image; und: the single tile, or every tile [+ thumbnail]),
    VIEW_THUMBNAIL the thumbnail alone. Rows that contradict the fold or their own metadata raise ShardError."""
    n_images = facts["n_images"].astype(np.int64)
    groups = facts["groups"].astype(np.int64)
    text = facts["text"].astype(np.int64)
    bad = (facts["fold_size"] != spec.fold.size) & (n_images > 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ShardError(f"sample {facts['key'][i].decode()!r}: codes hold fold groups of {int(facts['fold_size'][i])} codes, "
                         f"not {spec.fold} fold groups of {spec.fold.size}; re-tokenize with the model's fold")
    view = np.zeros(len(facts), np.int8)
    length = np.zeros(len(facts), np.int64)
    if task == "gen":  # generation has one image; if a thumbnail is present it is the whole image
        text_part = np.where(uncond, len(ids.prompt_uncond), len(ids.prompt_gen) + text)
        n = len(ids.start) + text_part + len(ids.turn) + (groups + 2) + len(ids.end)
        ok = (n_images > 0) & (n <= spec.seq_len)
        view[ok], length[ok] = VIEW_FIRST, n[ok]
        return length, view
    n_tiles = facts["tiles"].astype(np.int64)
    has_thumb = facts["thumbnail"] & (n_images == n_tiles + 1)
    wrong = (n_images != n_tiles + has_thumb) & (n_images > 0)
    if wrong.any():
        i = int(np.argmax(wrong))
        raise ShardError(f"sample {facts['key'][i].decode()!r}: {int(n_images[i])} images but {int(n_tiles[i])} tiles and "
                         f"thumbnail={bool(facts['thumbnail'][i])}; its shard disagrees with its metadata, re-tokenize it")
    base = len(ids.start) + len(ids.prompt_und) + len(ids.turn) + text + len(ids.end)
    first = (n_images > 0) & ((n_tiles == 1) | (n_tiles <= spec.max_tiles))
    m = np.where(n_tiles == 1, 1, n_tiles + (has_thumb & spec.thumbnail))
    n1 = base + m * (groups + 2) + np.where(n_tiles == 1, 0, m)  # <boi> IMG* <eoi>, plus a marker per image
    n2 = base + groups + 2
    use1 = first & (n1 <= spec.seq_len)
    use2 = ~use1 & has_thumb & (n2 <= spec.seq_len)
    view[use1], length[use1] = VIEW_FIRST, n1[use1]
    view[use2], length[use2] = VIEW_THUMBNAIL, n2[use2]
    return length, view


def layout_of(n_images: int, n_tiles: int, thumbnail: bool, task: str, view: int, length: int, spec: SequenceSpec) -> Layout:
    """The Layout a view of `plan_lengths` stands for, given the sample's image count, tiles and thumbnail flag."""
    if task == "gen":
        return Layout((n_images - 1,), "single", length)
    if view == VIEW_THUMBNAIL:
        return Layout((n_tiles,), "single", length)
    if n_tiles == 1:
        return Layout((0,), "single", length)
    with_thumb = thumbnail and n_images == n_tiles + 1 and spec.thumbnail
    return Layout(tuple(range(n_tiles + with_thumb)), "tiles+thumbnail" if with_thumb else "tiles", length)


def plan_layout(sample: TokenSample, task: str, uncond: bool, spec: SequenceSpec, ids: LayoutIds) -> Layout | None:
    """The layout the sample gets, or None when it cannot fit `spec.seq_len` without cutting an image."""
    facts = sample_facts(sample)
    length, view = plan_lengths(facts, task, np.array([uncond]), spec, ids)
    if view[0] == VIEW_DROPPED:
        return None
    f = facts[0]
    return layout_of(int(f["n_images"]), int(f["tiles"]), bool(f["thumbnail"]), task, int(view[0]), int(length[0]), spec)


def build_sequence(sample: TokenSample, task: str, uncond: bool, layout: Layout, ids: LayoutIds, source: str = "") -> Sequence:
    """Lay out one sample as `plan_layout` decided, as a standalone document (`train.packing` writes rows in place)."""
    L = layout.length
    input_ids = np.empty(L, np.int64)  # [L]
    labels = np.full(L, IGNORE, np.int64)
    image_mask = np.zeros(L, bool)
    image_targets = np.zeros(L, bool)
    codes = np.empty((len(layout.images) * int(sample.codes.shape[1]), sample.codes.shape[2]), np.int64)  # [N_img, fh*fw]
    write_sequence(sample, task, uncond, layout, ids, input_ids, labels, image_mask, image_targets, codes)
    return Sequence(input_ids, labels, image_mask, image_targets, codes, source=source, key=sample.key)


@functools.lru_cache(maxsize=8)
def _pieces(ids: LayoutIds) -> dict[str, np.ndarray]:
    """The fixed token runs of the layouts as arrays, made once per LayoutIds (writing a tuple converts it each time)."""
    return {k: np.asarray(getattr(ids, k), np.int64) for k in ("start", "prompt_und", "prompt_gen", "prompt_uncond", "turn", "end")}


def write_sequence(sample: TokenSample, task: str, uncond: bool, layout: Layout, ids: LayoutIds, input_ids: np.ndarray,
                   labels: np.ndarray, image_mask: np.ndarray, image_targets: np.ndarray, codes: np.ndarray) -> None:
    """Write one sample's sequence into views of `layout.length` slots (labels IGNORE and masks False on entry).

    `codes` [len(layout.images) * groups, fh*fw] receives the chosen images' fold groups in layout order."""
    groups = int(sample.codes.shape[1])
    p = _pieces(ids)
    t = 0

    def text(tokens: np.ndarray, target: bool = False) -> None:
        nonlocal t
        n = len(tokens)
        input_ids[t:t + n] = tokens
        if target:
            labels[t:t + n] = tokens
        t += n

    text(p["start"])
    if task == "und":
        n_tiles = len(layout.images) - (layout.kind == "tiles+thumbnail")
        for j, i in enumerate(layout.images):
            if layout.kind != "single":
                input_ids[t] = ids.tile if j < n_tiles else ids.thumbnail
                t += 1
            input_ids[t] = ids.boi
            input_ids[t + 1:t + 1 + groups] = ids.img
            image_mask[t + 1:t + 1 + groups] = True
            input_ids[t + 1 + groups] = ids.eoi
            t += groups + 2
        codes[:] = sample.codes[list(layout.images)].reshape(codes.shape)
        text(p["prompt_und"])
        text(p["turn"])
        text(sample.text_ids, target=True)
    else:
        if uncond:
            text(p["prompt_uncond"])
        else:
            text(p["prompt_gen"])
            text(sample.text_ids)
        text(p["turn"])
        (i,) = layout.images  # gen: one image, a code target, then <eoi> as a text target
        input_ids[t] = ids.boi
        input_ids[t + 1:t + 1 + groups] = ids.img
        image_mask[t + 1:t + 1 + groups] = True
        image_targets[t + 1:t + 1 + groups] = True
        codes[:] = sample.codes[i]
        t += 1 + groups
        input_ids[t] = labels[t] = ids.eoi
        t += 1
    text(p["end"], target=True)
    if t != layout.length:
        raise AssertionError(f"sample {sample.key!r}: built {t} positions, planned {layout.length}")  # an invariant, not data validation


# ---- generation prompts: the training sequences above, cut where the model's answer starts -------------


def _prompt_sample(codes: np.ndarray, text_ids, tiles: tuple[int, int], thumbnail: bool) -> TokenSample:
    """A TokenSample holding `codes [n_images, groups, k]` and `text_ids`, as `pipeline.tokenization` writes one."""
    return TokenSample(key="prompt", codes=codes, text_ids=np.asarray(text_ids, np.int64),
                       meta={"tiles": list(tiles), "thumbnail": thumbnail})


def understanding_prompt(ids: LayoutIds, n_images: int, groups: int, fold: Fold, tiles: tuple[int, int] = (1, 1),
                         thumbnail: bool = False, max_tiles: int | None = None) -> np.ndarray:
    """Ids of an understanding prompt over one image as tokenized (`n_images` = tiles [+ thumbnail], each of
    `groups` fold groups, `<img>` at image positions): the und sequence up to its first caption token.
    `max_tiles` is the stage's (default: every tile given)."""
    spec = SequenceSpec(10**9, max_tiles or tiles[0] * tiles[1], thumbnail, fold)
    sample = _prompt_sample(np.zeros((n_images, groups, fold.size), np.int64), [], tiles, thumbnail)
    layout = plan_layout(sample, "und", False, spec, ids)
    seq = build_sequence(sample, "und", False, layout, ids)
    return seq.input_ids[: int(np.argmax(seq.labels != IGNORE))]


def generation_prompt(ids: LayoutIds, caption_ids, uncond: bool = False) -> np.ndarray:
    """Ids of a text-to-image prompt: the gen sequence of `caption_ids` (or the unconditional prompt) up to
    and including `<boi>`; the image follows."""
    fold = Fold(1, 1)
    sample = _prompt_sample(np.zeros((1, 1, 1), np.int64), caption_ids, (1, 1), False)
    spec = SequenceSpec(10**9, 1, False, fold)
    seq = build_sequence(sample, "gen", uncond, plan_layout(sample, "gen", uncond, spec, ids), ids)
    return seq.input_ids[: int(np.argmax(seq.image_mask))]
