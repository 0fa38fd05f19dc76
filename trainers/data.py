"""LLaVA-RLHF data formats: loaders, vicuna_v1 rendering, images and collators.

Formats (JSON files, a list of records unless noted):

* SFT          ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}``;
               ``<image>`` in the first human turn (moved to its front); multi-turn and text-only allowed.
* Preference   the SFT record + ``"output_1": {"value"}``, ``"output_2": {"value"}``,
               ``"preference": 1|2`` (the better output), optional ``"hallucination"`` (bool, 0/1, true/false/yes/no);
               the last gpt turn is replaced by each output.
* Captions     ``image_to_caption.json``: ``{image_file: [caption, ...], "aok_" + image_file: [...]}``
               (the ``aok_`` entry is the multiple-choice ground truth); read only by a fact RM.
* PPO prompts  ``{"image"?, "conversations": [first human turn, ...], "caption_type"?: 1..7,
               "length_bonus"?: float}`` (absent: 1, 1.0); caption_type 1 general, 2-5 answer A-D, 6 "No", 7 "Yes".

Rendering (vicuna_v1) encodes text SEGMENTS separately and concatenates ids, as LLaVA does per
round with Llama's tokenizer (each ``add_special_tokens=False`` encode prepends one "▁")::

    [bos] enc(system + " USER: " + human1 + " ASSISTANT:") enc(gpt1) [eos]
          enc("USER: " + human2 + " ASSISTANT:") enc(gpt2) [eos] ...

labels = -100 except on the gpt segments and their eos. ``<image>`` becomes ``num_image_tokens``
copies of the tokenizer's ``<image>`` id (the model scatters one image feature per position).

Bad input raises ``DataError`` naming file, record index and field; with ``skip_bad=True`` a bad
record is skipped and counted instead (file-level errors - unreadable or malformed JSON - always
raise). Loaders return an ``Examples`` list whose ``.stats`` counts loaded/skipped/too-long records.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from factrl.model.tiny import make_image_processor  # re-exported: the tiny checkpoint's processor
from factrl.trainers import rm_prompt
from factrl.trainers.config import VICUNA_SYSTEM

log = logging.getLogger("factrl.data")

SYSTEM_PROMPT = VICUNA_SYSTEM  # the default of data.system_prompt
IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
CAPTION_TYPES = {1: None, 2: "A", 3: "B", 4: "C", 5: "D", 6: "no", 7: "yes"}


class DataError(ValueError):
    """A bad input file or record. ``file``, ``index`` (record index or captions key) and ``field``
    are attributes and appear in the message."""

    def __init__(self, file, index=None, field=None, msg: str = "invalid"):
        self.file, self.index, self.field, self.reason = str(file), index, field, msg
        where = [str(file)]
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(": ".join(where) + f": {msg}")


@dataclass
class LoadStats:
    file: str
    n_records: int = 0
    n_loaded: int = 0
    n_skipped: int = 0  # bad records skipped (skip_bad=True)
    n_too_long: int = 0  # dropped for exceeding max_len / max_prompt_len
    errors: list[str] = field(default_factory=list)  # messages of skipped records (first 100)


class Examples(list):
    """A list of examples with the loader's ``stats`` (LoadStats) attached."""

    stats: LoadStats


class Captions(dict):
    """load_captions' {key: [caption, ...]}, with the ``file`` it came from (named in errors)."""

    file: str = "the captions file"


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]
    image: Optional[str]
    id: str


@dataclass
class PreferenceExample:
    chosen_ids: list[int]  # full RM input: conversation + better output + (fact) prompt suffix
    rejected_ids: list[int]
    image: Optional[str]
    hallucination: Optional[bool]
    id: str
    chosen_suffix_len: int = 0  # tokens of chosen_ids after the response's EOS: the RM prompt (facts + template)
    rejected_suffix_len: int = 0  # the same for rejected_ids (differs only where the captions are shuffled)


@dataclass
class PromptExample:
    query_ids: list[int]  # [bos] system USER: human ASSISTANT:
    image: Optional[str]
    caption_type: int
    length_bonus: float
    captions: list[str]  # what the fact-augmented RM reads (rm_prompt.fact_key: image or aok_ entry)
    human: str
    id: str


# ---- file / record validation -----------------------------------------------------------------


def _read_json(path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(path, msg="file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(path, msg=f"malformed JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (UnicodeDecodeError, OSError, RecursionError, ValueError) as e:
        raise DataError(path, msg=f"unreadable: {type(e).__name__}: {e}") from None


def _records(path) -> list:
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(path, msg=f"expected a JSON list of records, got {type(data).__name__}")
    return data


def _require(rec: dict, key: str, types, f, i, what: str):
    if key not in rec:
        raise DataError(f, i, key, "missing")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, types):  # JSON true/false is never a valid value here
        raise DataError(f, i, key, f"expected {what}, got {type(v).__name__}")
    return v


def _record_id(rec: dict, f, i) -> str:
    v = rec.get("id", i)
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise DataError(f, i, "id", f"expected a string or integer, got {type(v).__name__}")
    return str(v)


def _record_image(rec: dict, f, i, image_folder) -> Optional[str]:
    if rec.get("image") is None:
        return None
    img = rec["image"]
    if not isinstance(img, str) or not img.strip():
        raise DataError(f, i, "image", f"expected a non-empty file name, got {img!r}")
    if image_folder is not None:
        problem = image_problem(os.path.join(image_folder, img))
        if problem:
            raise DataError(f, i, "image", problem)
    return img


_IMAGE_CHECKS: dict = {}  # (path, size, mtime) -> problem or None: SFT, RM, PPO and eval load the same images


def image_problem(path: str) -> Optional[str]:
    """None if ``path`` is an image that decodes, else why not; checked once per file version
    (a full decode: a 48 px PNG takes ~0.1 ms), so a bad image is an error naming its record when
    the dataset loads - or a skipped record with skip_bad_records - never a crash at its batch."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"image file not found: {path}"
    except OSError as e:
        return f"{path}: {e.strerror}"
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _IMAGE_CHECKS:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()
            _IMAGE_CHECKS[key] = None
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError ...
            _IMAGE_CHECKS[key] = f"not a readable image: {path} ({type(e).__name__}: {e})"
    return _IMAGE_CHECKS[key]


def _conversations(rec: dict, f, i, has_image: bool) -> list[tuple[str, str]]:
    """Validated [(from, value)], alternating human/gpt from a human turn; the image placeholder
    only in the first human turn, moved to its front (added there when the record has an image but
    no placeholder), as LLaVA's preprocess_multimodal (RLHF/data_utils/common_utils.py:214-221)."""
    conv = _require(rec, "conversations", list, f, i, "a list of turns")
    if not conv:
        raise DataError(f, i, "conversations", "empty")
    turns = []
    for j, t in enumerate(conv):
        if not isinstance(t, dict):
            raise DataError(f, i, f"conversations[{j}]", f"expected an object, got {type(t).__name__}")
        who = t.get("from")
        if who not in ("human", "gpt"):
            raise DataError(f, i, f"conversations[{j}].from", f"expected 'human' or 'gpt', got {who!r}")
        if who != ("human" if j % 2 == 0 else "gpt"):
            raise DataError(f, i, f"conversations[{j}].from", "turns must alternate human, gpt, human, ...")
        val = t.get("value")
        if not isinstance(val, str):
            raise DataError(f, i, f"conversations[{j}].value", f"expected a string, got {type(val).__name__}")
        if IMAGE_TOKEN in val and j != 0:
            raise DataError(
                f, i, f"conversations[{j}].value", f"{IMAGE_TOKEN} allowed only in the first human turn"
            )
        turns.append((who, val))
    n_img = turns[0][1].count(IMAGE_TOKEN)
    if n_img > 1:
        raise DataError(f, i, "conversations[0].value", f"{n_img} {IMAGE_TOKEN} placeholders (expected one)")
    if n_img and not has_image:
        raise DataError(f, i, "image", f"text has {IMAGE_TOKEN} but the record has no image")
    if has_image:  # "<image>\n" in front wherever it was, as LLaVA's preprocess_multimodal
        turns[0] = ("human", f"{IMAGE_TOKEN}\n" + turns[0][1].replace(IMAGE_TOKEN, "").strip())
    return turns


# ---- rendering --------------------------------------------------------------------------------


def _image_id(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token")
    return tid


# Memo of encoded pieces per tokenizer: datasets repeat the same answers/questions many times and
# one HF encode call costs ~0.15 ms in Python overhead. Weak keys: dropped with the tokenizer.
_ENC_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ENC_CACHE_MAX = 200_000


def _memo(tokenizer) -> Optional[dict]:
    try:
        return _ENC_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable / hashable: no memo
        return None


def _encode_piece(tokenizer, text: str) -> list[int]:
    memo = _memo(tokenizer)
    if memo is None:
        return tokenizer.encode(text, add_special_tokens=False)
    ids = memo.get(text)
    if ids is None:
        if len(memo) > _ENC_CACHE_MAX:
            memo.clear()
        ids = memo[text] = tuple(tokenizer.encode(text, add_special_tokens=False))
    return list(ids)


def _pieces(text: str) -> list[str]:
    """The text pieces ``encode_segment`` encodes one by one (around each ``<image>``, stripped)."""
    return [p for p in (part.strip() for part in text.split(IMAGE_TOKEN)) if p]


def prefetch(tokenizer, texts: Iterable[str]) -> None:
    """Encode every not-yet-memoized piece of ``texts`` in one batched tokenizer call, so the
    ``encode_segment`` calls that follow are memo hits. Same ids as one call per piece (the batch
    goes through the same encode); it saves the per-call overhead and lets a fast tokenizer use
    its threads: the fact RM's prompts, one per output with freshly shuffled captions, are all
    distinct, and encoding them one by one was most of the RM's data loading."""
    memo = _memo(tokenizer)
    if memo is None:
        return
    todo = list(dict.fromkeys(p for t in texts for p in _pieces(t) if p not in memo))
    if not todo:
        return
    if len(memo) + len(todo) > _ENC_CACHE_MAX:
        memo.clear()
    for piece, ids in zip(todo, tokenizer(todo, add_special_tokens=False)["input_ids"]):
        memo[piece] = tuple(ids)


def encode_segment(tokenizer, text: str, num_image_tokens: int) -> list[int]:
    """ids of one text segment; each ``<image>`` -> ``num_image_tokens`` image ids. Text around
    the placeholder is stripped (the tokenizer re-adds one leading "▁" per piece)."""
    parts = text.split(IMAGE_TOKEN)
    ids: list[int] = []
    for j, part in enumerate(parts):
        if j:
            ids += [_image_id(tokenizer)] * num_image_tokens
        part = part.strip()
        if part:
            ids += _encode_piece(tokenizer, part)
    return ids


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _human_segment(human: str, first: bool, system: str) -> str:
    return (f"{system} " if first and system else "") + "USER: " + human.strip() + " ASSISTANT:"


def render_conversation(
    tokenizer, turns: list[tuple[str, str]], num_image_tokens: int, system: str = SYSTEM_PROMPT
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of alternating (from, value) turns; labels only on gpt turns + eos."""
    ids, labels = _bos(tokenizer), [IGNORE_INDEX] * len(_bos(tokenizer))
    for j, (who, val) in enumerate(turns):
        if who == "human":
            seg = encode_segment(tokenizer, _human_segment(val, j == 0, system), num_image_tokens)
            ids += seg
            labels += [IGNORE_INDEX] * len(seg)
        else:
            seg = encode_segment(tokenizer, val, 0) + [tokenizer.eos_token_id]
            ids += seg
            labels += seg
    return ids, labels


def render_query(
    tokenizer, human_text: str, num_image_tokens: int, has_image: bool, system: str = SYSTEM_PROMPT
) -> list[int]:
    """[bos] + enc(system USER: human ASSISTANT:) - the generation prompt for one question."""
    if not has_image and IMAGE_TOKEN in human_text:
        raise ValueError(f"human text has {IMAGE_TOKEN} but has_image=False")
    if has_image:  # "<image>\n" in front wherever it was, as RLHF/data_utils/common_utils.py:214-221
        human_text = f"{IMAGE_TOKEN}\n" + human_text.replace(IMAGE_TOKEN, "").strip()
    return _bos(tokenizer) + encode_segment(
        tokenizer, _human_segment(human_text, True, system), num_image_tokens
    )


def build_rm_input(tokenizer, query_ids: list[int], response_ids: list[int], prompt: str) -> list[int]:
    """RM input for PPO: query (its left padding removed) + response (its padding removed; its EOS
    kept when it stopped, as the original's) + the rendered RM ``prompt`` (rm_prompt.render) — the
    layout ``load_preferences`` trains on, where every response ends with EOS."""
    pad_id = tokenizer.pad_token_id
    q, r = list(query_ids), list(response_ids)
    while q and pad_id is not None and q[0] == pad_id:
        q.pop(0)
    while r and pad_id is not None and r[-1] == pad_id and pad_id != tokenizer.eos_token_id:
        r.pop()
    return q + r + encode_segment(tokenizer, prompt, 0)


def _facts_for(image: Optional[str], captions: Optional[dict], f, i, caption_type: Optional[int] = None) -> list[str]:
    """The captions the fact RM reads for this record (rm_prompt.fact_key); [] without image or captions."""
    if image is None or captions is None:
        return []
    key = rm_prompt.fact_key(image, caption_type)
    if key not in captions:
        raise DataError(f, i, "image", f"no captions entry {key!r} for image {image!r} in "
                        + getattr(captions, "file", "the captions file"))
    return list(captions[key])


# ---- loaders ----------------------------------------------------------------------------------


def _load(path, skip_bad: bool, one: Callable[[Any, int], Any],
          finish: Optional[Callable[[list], list]] = None) -> Examples:
    """Apply ``one(record, index)`` (-> example, or None when too long) to every record.
    ``finish``: when given, ``one`` returns a partial example and ``finish(partials)`` completes
    them all at once (-> example, or None when too long), for work that is cheaper in a batch."""
    recs = _records(path)
    out = Examples()
    out.stats = st = LoadStats(file=str(path), n_records=len(recs))
    partial = []
    for i, rec in enumerate(recs):
        try:
            if not isinstance(rec, dict):
                raise DataError(path, i, None, f"expected an object, got {type(rec).__name__}")
            ex = one(rec, i)
        except DataError as e:
            if not skip_bad:
                raise
            st.n_skipped += 1
            if len(st.errors) < 100:
                st.errors.append(str(e))
            continue
        partial.append(ex)
    for ex in finish(partial) if finish is not None else partial:
        if ex is None:
            st.n_too_long += 1
        else:
            out.append(ex)
    st.n_loaded = len(out)
    if st.n_skipped or st.n_too_long:
        log.info(
            "%s: loaded %d of %d records (%d bad skipped, %d too long dropped)",
            path,
            st.n_loaded,
            st.n_records,
            st.n_skipped,
            st.n_too_long,
        )
    return out


def load_sft(
    path,
    tokenizer,
    num_image_tokens: int,
    max_len: int,
    skip_bad: bool = False,
    image_folder: Optional[str] = None,
    system: str = SYSTEM_PROMPT,
) -> Examples:
    """SFT conversations -> [SFTExample]. Longer than ``max_len`` tokens: dropped and counted.
    ``image_folder``: when given, every record's image file must exist there."""

    def one(rec, i):
        img = _record_image(rec, path, i, image_folder)
        turns = _conversations(rec, path, i, img is not None)
        if turns[-1][0] != "gpt":
            raise DataError(path, i, "conversations", "the last turn must be from gpt")
        ids, labels = render_conversation(tokenizer, turns, num_image_tokens, system)
        if len(ids) > max_len:
            return None
        return SFTExample(input_ids=ids, labels=labels, image=img, id=_record_id(rec, path, i))

    return _load(path, skip_bad, one)


def _output(rec, key, f, i) -> str:
    o = _require(rec, key, dict, f, i, 'an object {"value": ...}')
    if not isinstance(o.get("value"), str):
        raise DataError(f, i, f"{key}.value", f"expected a string, got {type(o.get('value')).__name__}")
    return o["value"]


_FLAGS = {True: True, False: False, "true": True, "false": False, "yes": True, "no": False}


def _hallucination_flag(h, f, i) -> Optional[bool]:
    """The optional ``hallucination`` field: bool, 0/1, or true/false/yes/no in any case."""
    key = h.strip().lower() if isinstance(h, str) else h
    if h is not None and (not isinstance(key, (bool, int, str)) or key not in _FLAGS):
        raise DataError(f, i, "hallucination", f"expected true/false (or 0/1, yes/no), got {h!r}")
    return None if h is None else _FLAGS[key]


def load_preferences(
    path,
    tokenizer,
    num_image_tokens: int,
    max_len: int,
    captions: Optional[dict],
    fact_augmented: bool,
    template: Optional[str] = None,
    skip_bad: bool = False,
    image_folder: Optional[str] = None,
    system: str = SYSTEM_PROMPT,
    seed: int = 0,
    shuffle_captions: bool = True,
) -> Examples:
    """Preference pairs -> [PreferenceExample]; chosen/rejected ids are complete RM inputs:
    conversation + output + EOS + the RM prompt (rm_prompt), with the image's captions shuffled by
    a ``seed``ed RNG for each output when ``fact_augmented`` (data_utils_rm.py:85-90 shuffles per
    output too; ``shuffle_captions=False``: in the captions file's order, the same for both outputs).
    ``captions`` (load_captions) is needed only when ``fact_augmented``."""
    if fact_augmented and captions is None:
        raise ValueError("fact_augmented=True needs the captions dict (load_captions)")
    tmpl = rm_prompt.load_template(template, fact_augmented)  # fail early on a bad template
    rng = random.Random(seed) if shuffle_captions else None

    def one(rec, i):
        img = _record_image(rec, path, i, image_folder)
        turns = _conversations(rec, path, i, img is not None)
        if turns[-1][0] == "gpt":
            turns = turns[:-1]  # the last gpt turn is replaced by each output
        if not turns:
            raise DataError(path, i, "conversations", "no human turn before the outputs")
        out1, out2 = _output(rec, "output_1", path, i), _output(rec, "output_2", path, i)
        pref = _require(rec, "preference", int, path, i, "1 or 2")
        if pref not in (1, 2):
            raise DataError(path, i, "preference", f"expected 1 or 2, got {pref!r}")
        h = _hallucination_flag(rec.get("hallucination"), path, i)
        facts = _facts_for(img, captions, path, i) if fact_augmented else []
        prefix, _ = render_conversation(tokenizer, turns, num_image_tokens, system)
        # each output's text and its RM prompt (captions shuffled in record order), encoded in finish
        texts = [(out, rm_prompt.render(tmpl, facts, rng)) for out in (out1, out2)]
        return prefix, texts, pref, img, h, _record_id(rec, path, i)

    def finish(partial):
        prefetch(tokenizer, (t for p in partial for pair in p[1] for t in pair))
        return [complete(*p) for p in partial]

    def complete(prefix, texts, pref, img, h, rid):
        suffix = [encode_segment(tokenizer, prompt, 0) for _, prompt in texts]
        ids1, ids2 = (prefix + encode_segment(tokenizer, out, 0) + [tokenizer.eos_token_id] + sfx
                      for (out, _), sfx in zip(texts, suffix))
        if max(len(ids1), len(ids2)) > max_len:
            return None
        chosen, rejected = (ids1, ids2) if pref == 1 else (ids2, ids1)
        return PreferenceExample(chosen_ids=chosen, rejected_ids=rejected, image=img, hallucination=h, id=rid,
                                 chosen_suffix_len=len(suffix[pref - 1]), rejected_suffix_len=len(suffix[2 - pref]))

    return _load(path, skip_bad, one, finish)


def load_captions(path) -> Captions:
    """image_to_caption.json -> {image file (or "aok_" + file): [caption, ...]} (a lone string is
    taken as one caption) as a ``Captions`` dict whose ``.file`` is ``path``."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(path, msg=f"expected a JSON object {{image: [captions]}}, got {type(data).__name__}")
    out = Captions()
    out.file = str(path)
    for k, v in data.items():
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
            raise DataError(path, k, "captions", "expected a list of strings")
        out[k] = list(v)
    return out


def other_scenes_captions(captions: Captions) -> Captions:
    """Every key given the captions of the next key in sorted order (a rotation: no key keeps its
    own unless all are the same). A fact RM that reads its facts must lose held-out accuracy on
    these; one that does not is judging the response alone (README, "Why Fact-RLHF does not work")."""
    keys = sorted(captions)
    out = Captions(zip(keys, (captions[k] for k in keys[1:] + keys[:1])))
    out.file = f"{captions.file} (rotated: each image given another's captions)"
    return out


def load_ppo_prompts(
    path,
    tokenizer,
    num_image_tokens: int,
    max_prompt_len: int,
    captions: Optional[dict],
    skip_bad: bool = False,
    image_folder: Optional[str] = None,
    system: str = SYSTEM_PROMPT,
) -> Examples:
    """PPO prompts -> [PromptExample] (query ends with "ASSISTANT:"); prompts longer than
    ``max_prompt_len`` TEXT tokens are dropped and counted (``.stats.n_too_long``, logged). The
    expanded image tokens do not count: the original recipe's 128-token query limit is on text
    (LLaVA-1.5 adds 576 image positions to every prompt)."""

    def one(rec, i):
        img = _record_image(rec, path, i, image_folder)
        turns = _conversations(rec, path, i, img is not None)
        # absent: 1 (general) and 1.0, as RLHF/data_utils/data_utils_ppo.py:123-131
        ct = _require(rec, "caption_type", int, path, i, "an integer 1..7") if "caption_type" in rec else 1
        if ct not in CAPTION_TYPES:
            raise DataError(path, i, "caption_type", f"expected 1..7, got {ct!r}")
        lb = _require(rec, "length_bonus", (int, float), path, i, "a number") if "length_bonus" in rec else 1.0
        if not math.isfinite(lb):
            raise DataError(path, i, "length_bonus", f"expected a finite number, got {lb!r}")
        facts = _facts_for(img, captions, path, i, ct)
        q = render_query(tokenizer, turns[0][1], num_image_tokens, img is not None, system)
        if len(q) - (num_image_tokens if img is not None else 0) > max_prompt_len:
            return None
        return PromptExample(
            query_ids=q,
            image=img,
            caption_type=ct,
            length_bonus=float(lb),
            captions=facts,
            human=turns[0][1],
            id=_record_id(rec, path, i),
        )

    return _load(path, skip_bad, one)


# ---- question types ---------------------------------------------------------------------------
def record_fields(path, fields=("question_type",)) -> dict[str, dict[str, str]]:
    """{field: {record id: value}} of a preference or PPO file's metadata ``fields`` (``question_type``;
    ``lie_kind``: what a planted pair's rejected output lies about), the file read once; records
    without a field are left out of its map."""
    records = _read_json(Path(path))
    return {f: {_record_id(r, path, i): str(r[f]) for i, r in enumerate(records)
                if isinstance(r, dict) and r.get(f) is not None} for f in fields}


def select_question_types(examples: list, path, types: list, key: str) -> list:
    """The ``examples`` (loaded from ``path``) whose record's ``question_type`` is in ``types``; all of
    them when ``types`` is empty. ``key`` (the config key) is named in the errors: a record without
    the field, or a selection that keeps nothing."""
    if not types:
        return examples
    qt = record_fields(path)["question_type"]
    for e in examples:
        if e.id not in qt:
            raise DataError(path, e.id, "question_type", f"missing: {key}={list(types)} selects by it")
    kept = [e for e in examples if qt[e.id] in types]
    if not kept:
        raise DataError(path, msg=f"{key}={list(types)} keeps none of its {len(examples)} records "
                        f"(their question types: {', '.join(sorted(set(qt.values())))})")
    print(f"[factrl] {key}={list(types)}: {len(kept)} of {len(examples)} records of {Path(path).name}")
    return kept


# ---- correctness bonus ------------------------------------------------------------------------


def is_correct(response_text: str, caption_type: int) -> Optional[bool]:
    """Is a response right for a prompt with known answer? None for caption_type 1 (general).
    2-5: the option letter (A-D) given first (or "the answer is X"); 6/7: an explicit "No"/"Yes"
    in the first sentence (POPE parsing; a response with neither word is not correct)."""
    from .metrics import parse_choice, parse_yes_no

    want = CAPTION_TYPES.get(caption_type, "?")
    if want == "?":
        raise ValueError(f"caption_type must be 1..7, got {caption_type!r}")
    if want is None:
        return None
    if want in "ABCD":
        return parse_choice(response_text) == want
    words = [w.strip("!?;:\"'(),").lower() for w in response_text.split(".")[0].split()]
    if not ({"yes", "no", "not"} & set(words)):
        return False
    return parse_yes_no(response_text) == want


# ---- images -----------------------------------------------------------------------------------





def expand2square(img, background: tuple[int, int, int]):
    """LLaVA's pad-to-square: paste the image centred on a square of the background colour."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def load_image(path, processor, aspect: str = "pad") -> torch.Tensor:
    """[3, H, W] float pixel values. aspect: "pad" (LLaVA: pad to square with the processor's mean
    colour x 255, then process), "resize" (squash to a square), "crop" (processor's own crop)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except FileNotFoundError:
        raise DataError(path, field="image", msg="image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # PIL's damaged-file errors vary
        raise DataError(path, field="image", msg=f"not a readable image: {e}") from None
    if aspect == "pad":
        img = expand2square(img, tuple(int(x * 255) for x in processor.image_mean))
    elif aspect == "resize":
        side = max(img.size)
        img = img.resize((side, side), Image.Resampling.BICUBIC)
    elif aspect != "crop":
        raise ValueError(f"aspect must be pad | resize | crop, got {aspect!r}")
    return processor(images=img, return_tensors="pt")["pixel_values"][0].float()


def image_loader(
    image_folder, processor, aspect: str = "pad", cache_size: int = 4096
) -> Callable[[str], torch.Tensor]:
    """file name -> pixel values, with an LRU cache (ShapesWorld reuses every image many times)."""

    @lru_cache(maxsize=cache_size)
    def load(name: str) -> torch.Tensor:
        return load_image(os.path.join(image_folder, name), processor, aspect)

    return load


# ---- collators --------------------------------------------------------------------------------


def pad(seqs, value: int, left: bool = False, length: Optional[int] = None) -> torch.Tensor:
    """``[B, T]`` long: sequences (id lists or 1-D tensors) padded with ``value`` to the longest
    (at least ``length``) on the right, or the ``left``. The one padding helper: the collators,
    PPO's rollouts and RM inputs, and eval's generation prompts all use it."""
    T = max([len(s) for s in seqs] + [length or 0])
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s):
            if left:
                out[b, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[b, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def pad_mask(seqs, T: Optional[int] = None, left: bool = False) -> torch.Tensor:
    """The attention mask ``[B, T]`` (1 on real tokens) of ``pad(seqs, ..., left, T)``."""
    return pad([[1] * len(s) for s in seqs], 0, left, T)


def _pixels(examples, images) -> Optional[torch.Tensor]:
    names = [e.image for e in examples if e.image is not None]
    if not names:
        return None
    if images is None:
        raise ValueError("examples have images but no image loader was given")
    return torch.stack([images(n) for n in names])  # (n_img, 3, H, W), batch order


def collate_sft(
    examples: list[SFTExample], pad_id: int, images: Optional[Callable[[str], torch.Tensor]] = None
) -> dict:
    """Right-padded batch: input_ids/attention_mask/labels (B, T) long (labels -100 on padding),
    pixel_values (n_img, 3, H, W) for the examples that have an image (batch order) or None,
    has_image (B,) bool."""
    ids = [e.input_ids for e in examples]
    x = pad(ids, pad_id)
    return {
        "input_ids": x,
        "attention_mask": pad_mask(ids, x.shape[1]),
        "labels": pad([e.labels for e in examples], IGNORE_INDEX, length=x.shape[1]),
        "pixel_values": _pixels(examples, images),
        "has_image": torch.tensor([e.image is not None for e in examples]),
    }


def collate_preferences(
    examples: list[PreferenceExample], pad_id: int, images: Optional[Callable[[str], torch.Tensor]] = None
) -> dict:
    """chosen_input_ids/chosen_attention_mask and rejected_* (B, T), right-padded to ONE common T
    (so a trainer may concatenate them into 2B rows); pixel_values as in collate_sft (one per
    example, shared by its two responses); hallucination (B,) long: -1 unknown, 0, 1;
    chosen_suffix_len / rejected_suffix_len (B,) long: each row's RM-prompt tokens after its response."""
    c = [e.chosen_ids for e in examples]
    r = [e.rejected_ids for e in examples]
    T = max(len(s) for s in c + r)
    return {
        "chosen_input_ids": pad(c, pad_id, length=T),
        "chosen_attention_mask": pad_mask(c, T),
        "rejected_input_ids": pad(r, pad_id, length=T),
        "rejected_attention_mask": pad_mask(r, T),
        "pixel_values": _pixels(examples, images),
        "has_image": torch.tensor([e.image is not None for e in examples]),
        "hallucination": torch.tensor(
            [-1 if e.hallucination is None else int(e.hallucination) for e in examples]
        ),
        "chosen_suffix_len": torch.tensor([e.chosen_suffix_len for e in examples]),
        "rejected_suffix_len": torch.tensor([e.rejected_suffix_len for e in examples]),
    }


def collate_prompts(
    examples: list[PromptExample], pad_id: int, images: Optional[Callable[[str], torch.Tensor]] = None
) -> dict:
    """LEFT-padded queries for generation: input_ids/attention_mask (B, T); pixel_values;
    caption_type (B,) long; length_bonus (B,) float32; has_image (B,) bool."""
    q = [e.query_ids for e in examples]
    x = pad(q, pad_id, left=True)
    return {
        "input_ids": x,
        "attention_mask": pad_mask(q, x.shape[1], left=True),
        "pixel_values": _pixels(examples, images),
        "has_image": torch.tensor([e.image is not None for e in examples]),
        "caption_type": torch.tensor([e.caption_type for e in examples], dtype=torch.long),
        "length_bonus": torch.tensor([e.length_bonus for e in examples], dtype=torch.float32),
    }


# ---- tokenizer corpus -------------------------------------------------------------------------

_NON_TEXT_KEYS = {"id", "image", "from", "spec", "split", "category", "label", "type", "question_type", "lie_kind"}


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        s = obj.replace(IMAGE_TOKEN, " ").strip()
        if s:
            yield s
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in _NON_TEXT_KEYS:
                yield from _strings(v)


def text_corpus(data_root, exclude: tuple = ()) -> Iterator[str]:
    """Every text in a dataset folder (questions, answers, outputs, captions, eval questions) plus
    the system prompt, the rendering words and both RM templates - to train the tiny tokenizer on.
    Files are read in sorted order, so the corpus (and the tokenizer) is deterministic. ``exclude``:
    file names (relative to ``data_root``) left out."""
    yield SYSTEM_PROMPT
    yield "USER: ASSISTANT:"
    for fact in (True, False):
        yield rm_prompt.load_template("factrl", fact).replace("{captions}", "")
    skip = {Path(data_root) / e for e in exclude if e}
    for p in sorted(Path(data_root).rglob("*.json")):
        if p in skip:
            continue
        try:
            yield from _strings(_read_json(p))
        except DataError:
            continue


__all__ = [
    "SYSTEM_PROMPT",
    "DataError",
    "LoadStats",
    "Examples",
    "SFTExample",
    "PreferenceExample",
    "PromptExample",
    "load_sft",
    "load_preferences",
    "load_captions",
    "load_ppo_prompts",
    "build_rm_input",
    "is_correct",
    "load_image",
    "make_image_processor",
    "image_loader",
    "collate_sft",
    "collate_preferences",
    "collate_prompts",
    "pad",
    "pad_mask",
    "render_query",
    "render_conversation",
    "encode_segment",
    "text_corpus",
]
