"""The published hallucination benchmarks from their own files: POPE, MMHal-Bench, CHAIR.

Each reads the benchmark's files as published, asks a ``generate_fn(items) -> responses`` (items:
``{"image": file name in the benchmark's image folder, "question": text}``, at most ``batch_size``
at a time, each distinct (image, question) asked once), writes the responses in the format the
benchmark's own scripts read, and scores them as those scripts do:

* POPE (Li et al. 2023) as LLaVA-RLHF evaluates it: ``Eval/eval_scripts/eval_pope.sh`` (question +
  "\\nAnswer the question using a single word or phrase."), ``Eval/model_vqa.py`` (answers file),
  ``Eval/summarize_eval_pope.py`` (parse and metrics). Repository llava-rlhf/LLaVA-RLHF at 830a083.
* MMHal-Bench (Sun et al. 2023): ``response_template.json`` records, responses written as
  ``Eval/model_vqa_mmhal.py`` writes them, judged with ``Eval/eval_gpt_mmhal.py``'s prompt
  (``templates/mmhal_judge_prompt.txt``, verbatim) and rating parse over any OpenAI-compatible
  chat-completions endpoint.
* CHAIR (Rohrbach et al. 2018): COCO instance annotations (optionally also the captions, as the
  original) and the paper's synonym list (``benchdata/chair_synonyms.txt``, verbatim from
  LisaAnne/Hallucination ``data/synonyms.txt`` at 6e4d33c), the word matching of its
  ``utils/chair.py``; object recall as Maxlinn/CHAIR-metric-standalone adds it.

Generic: nothing here knows the embedded world; ShapesWorld exports its POPE sets in POPE's format.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Optional

from factrl.trainers.data import DataError
from factrl.trainers.metrics import chair_metrics, pope_metrics

GenerateFn = Callable[[list[dict]], list[str]]
HERE = Path(__file__).parent


def _bar(it, total: int, desc: str, progress: bool):
    if not progress:
        return it
    from tqdm.auto import tqdm

    # Into a file or pipe, a line every 30 s instead of one per batch (as trainers/logs.py).
    return tqdm(it, total=total, desc=desc, unit="batch", file=sys.stderr,
                mininterval=0.1 if sys.stderr.isatty() else 30)


def generate_all(generate_fn: GenerateFn, items: Iterable[dict], batch_size: int, progress: bool = False,
                 desc: str = "generate") -> dict[tuple[str, str], str]:
    """{(image, question): response} for the distinct (image, question) pairs of ``items``, asked
    in order, ``batch_size`` at a time (greedy decoding gives a repeated question the same answer)."""
    keys = list(dict.fromkeys((it["image"], it["question"]) for it in items))
    out: dict[tuple[str, str], str] = {}
    starts = range(0, len(keys), batch_size)
    for i in _bar(starts, len(starts), desc, progress):
        chunk = keys[i:i + batch_size]
        res = generate_fn([{"image": im, "question": q} for im, q in chunk])
        if len(res) != len(chunk):
            raise ValueError(f"generate_fn returned {len(res)} responses for {len(chunk)} items")
        out.update({k: str(r) for k, r in zip(chunk, res)})
    return out


def _read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(path, msg="file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(path, msg=f"not valid JSON: {e}") from None


def _require(rec, fields: Iterable[str], path, i) -> None:
    if not isinstance(rec, dict):
        raise DataError(path, i, msg=f"expected an object, got {type(rec).__name__}")
    for k in fields:
        if k not in rec:
            raise DataError(path, i, k, "missing")


def _write_json(path: Path, obj, indent: Optional[int] = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
    return path


# ---- POPE -------------------------------------------------------------------------------------------------

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."  # eval_pope.sh:22 --test-prompt
POPE_FIELDS = ("question_id", "image", "text", "label")


def pope_parse(text: str) -> str:
    """"yes"/"no" exactly as Eval/summarize_eval_pope.py:11-23: keep the text before the first ".",
    drop commas, split on spaces; "No", "not" or "no" among the words -> "no", else "yes". (Stricter
    than ``metrics.parse_yes_no``: "NO", "no!" or "Not" read as "yes" here, as in the original.)"""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def load_pope(path) -> list[dict]:
    """A POPE question file: one JSON object per line with question_id, image, text, label (yes/no)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, msg="POPE question file not found")
    recs = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, i, msg=f"line {i + 1} is not valid JSON: {e}") from None
        _require(rec, POPE_FIELDS, path, i)
        if rec["label"] not in ("yes", "no"):
            raise DataError(path, i, "label", f"expected 'yes' or 'no', got {rec['label']!r}")
        recs.append(rec)
    return recs


def pope_answers(records: list[dict], texts: list[str], model_id: str) -> list[dict]:
    """Answer lines as Eval/model_vqa.py:200-210 writes them (what summarize_eval_pope.py reads)."""
    return [{"question_id": r["question_id"], "prompt": r["text"], "text": t,
             "answer_id": f"{model_id}-{r['question_id']}", "model_id": model_id, "metadata": {}}
            for r, t in zip(records, texts, strict=True)]


def score_pope(records: list[dict], texts: list[str]) -> dict:
    """summarize_eval_pope.py's metrics (accuracy, precision, recall, F1, yes-ratio, counts); answers
    and labels are joined by position, as there."""
    return pope_metrics([pope_parse(t) for t in texts], [r["label"] for r in records])


def run_pope(generate_fn: GenerateFn, files: dict[str, Path], suffix: str = POPE_SUFFIX,
             max_items: Optional[int] = None, batch_size: int = 16, progress: bool = False,
             out_dir: Optional[Path] = None, model_id: str = "model") -> dict:
    """{split: metrics} for the question files ``files`` ({split: path}); with ``out_dir``, each
    split's answers as ``<out_dir>/answers_<model_id>_<split>.jsonl`` (summarize_eval_pope.py's
    --answers-file; --label-file is the question file)."""
    sets = {split: load_pope(p)[:max_items or None] for split, p in files.items()}
    asked = lambda r: {"image": r["image"], "question": r["text"] + suffix}  # noqa: E731 (model_vqa.py:111-124)
    responses = generate_all(generate_fn, [asked(r) for rs in sets.values() for r in rs], batch_size, progress,
                             f"POPE {model_id}")
    res = {}
    for split, recs in sets.items():
        texts = [responses[(r["image"], r["text"] + suffix)] for r in recs]
        res[split] = score_pope(recs, texts)
        if out_dir is not None:
            lines = "".join(json.dumps(a) + "\n" for a in pope_answers(recs, texts, model_id))
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / f"answers_{model_id}_{split}.jsonl").write_text(lines)
    return res


# ---- MMHal-Bench ------------------------------------------------------------------------------------------

# The fields of response_template.json (read by eval_gpt_mmhal.py:95-96; written back by
# model_vqa_mmhal.py:191-194 with model_answer filled in). image_src's file name is the image's
# name in the images folder (the benchmark's layout); an image_path field, when present, wins.
MMHAL_FIELDS = ("question_type", "image_src", "image_content", "question", "gt_answer")
# eval_gpt_mmhal.py:146-150 reads the type as i % 8 of the published order; these are its 8 types.
MMHAL_TYPES = ("attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other")
MMHAL_PROMPT = HERE / "templates" / "mmhal_judge_prompt.txt"  # eval_gpt_mmhal.py:6-74, verbatim


def load_mmhal(path) -> list[dict]:
    path = Path(path)
    recs = _read_json(path)
    if not isinstance(recs, list):
        raise DataError(path, msg=f"expected a list of records, got {type(recs).__name__}")
    for i, r in enumerate(recs):
        _require(r, MMHAL_FIELDS, path, i)
        if not isinstance(r["image_content"], list):
            raise DataError(path, i, "image_content", "expected a list of object names")
    return recs


def mmhal_image(rec: dict) -> str:
    """The image's file name in the benchmark's images folder."""
    return str(rec.get("image_path") or rec["image_src"]).replace("\\", "/").split("/")[-1]


def mmhal_responses(generate_fn: GenerateFn, records: list[dict], suffix: str = "", batch_size: int = 16,
                    progress: bool = False, model_id: str = "model") -> list[dict]:
    """The records with ``model_answer`` filled in: the responses file eval_gpt_mmhal.py --response
    reads. eval_mmhal.sh passes --test-prompt '' (no suffix)."""
    asked = [{"image": mmhal_image(r), "question": r["question"] + suffix} for r in records]
    responses = generate_all(generate_fn, asked, batch_size, progress, f"MMHal {model_id}")
    return [{**r, "model_answer": responses[(a["image"], a["question"])]} for r, a in zip(records, asked)]


def judge_prompt(rec: dict, template: Optional[str] = None) -> str:
    """The judge's input for one answered record (eval_gpt_mmhal.py:95-96)."""
    template = MMHAL_PROMPT.read_text() if template is None else template
    return template.format(", ".join(rec["image_content"]), rec["question"], rec["gt_answer"], rec["model_answer"])


def parse_rating(review: str) -> Optional[int]:
    """eval_gpt_mmhal.py:128-137: the one s in 0..6 with "rating: s" in the lower-cased review; None
    when none or several are found (the script then warns and scores 0)."""
    found = [s for s in range(7) if f"rating: {s}" in review.lower()]
    return found[0] if len(found) == 1 else None


def chat_completion(base_url: str, model: str, prompt: str, api_key: str = "", temperature: float = 0.0,
                    timeout_s: float = 120.0, retries: int = 5, retry_wait_s: float = 10.0) -> dict:
    """POST ``{base_url}/chat/completions`` (the OpenAI chat API, as eval_gpt_mmhal.py:102-108: one
    user message, temperature 0); the parsed JSON response. Retries ``retries`` times on HTTP or
    connection errors (the original retries forever, 10 s apart)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "temperature": temperature}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    url = base_url.rstrip("/") + "/chat/completions"
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                out = json.loads(r.read().decode())
            if not isinstance(out["choices"][0]["message"]["content"], str):  # a malformed reply fails here
                raise ValueError(f"no text in the reply: {out['choices'][0]['message']!r}")
            return out
        except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, IndexError, ValueError) as e:
            if attempt == retries:
                raise RuntimeError(f"judge at {url} failed after {retries + 1} attempts: {e}") from e
            print(f"[factrl] judge request failed ({e}); retrying in {retry_wait_s:g} s", file=sys.stderr)
            time.sleep(retry_wait_s)
    raise AssertionError("unreachable")


def judge_mmhal(answered: list[dict], base_url: str, model: str, api_key: str = "", temperature: float = 0.0,
                timeout_s: float = 120.0, retries: int = 5, retry_wait_s: float = 10.0,
                progress: bool = False) -> list[dict]:
    """The judge's reply per answered record, in order: the review file eval_gpt_mmhal.py
    --evaluation writes and summarize_gpt_mmhal.py reads."""
    template = MMHAL_PROMPT.read_text()
    return [chat_completion(base_url, model, judge_prompt(r, template), api_key, temperature, timeout_s, retries,
                            retry_wait_s)
            for r in _bar(answered, len(answered), "MMHal judge", progress)]


def score_mmhal(answered: list[dict], reviews: list[dict]) -> dict:
    """eval_gpt_mmhal.py:125-154: ratings 0-6 (unparsable = 0), hallucination = rating < 3; the
    average score and hallucination rate overall and per question_type."""
    ratings = []
    for i, rv in enumerate(reviews):
        r = parse_rating(rv["choices"][0]["message"]["content"])
        if r is None:
            print(f"[factrl] MMHal review {i}: zero or several ratings found, scored 0", file=sys.stderr)
        ratings.append(0 if r is None else r)

    def agg(rs: list[int]) -> dict:
        return {"score": sum(rs) / len(rs), "hallucination_rate": sum(r < 3 for r in rs) / len(rs), "n": len(rs)}

    by: dict[str, list[int]] = {}
    for rec, r in zip(answered, ratings, strict=True):
        by.setdefault(str(rec["question_type"]), []).append(r)
    order = [t for t in MMHAL_TYPES if t in by] + sorted(set(by) - set(MMHAL_TYPES))
    return {**(agg(ratings) if ratings else {"score": None, "hallucination_rate": None, "n": 0}),
            "ratings": ratings, "per_type": {t: agg(by[t]) for t in order}}


def mmhal_table(scores: dict[str, dict]) -> str:
    """Average rating and hallucination rate per question type, one column pair per model."""
    names = list(scores)
    types = list(dict.fromkeys(t for s in scores.values() for t in s["per_type"]))
    w = max([14] + [len(n) + 10 for n in names])  # "<name> halluc." fits
    head = f"{'MMHal-Bench':<12}" + "".join(f"{n + ' score':>{w}}{n + ' halluc.':>{w}}" for n in names)
    lines = [head, "-" * len(head)]
    for label, get in [("overall", lambda s: s)] + [(t, lambda s, t=t: s["per_type"].get(t)) for t in types]:
        cells = ""
        for n in names:
            d = get(scores[n])
            cells += f"{d['score']:>{w}.2f}{d['hallucination_rate']:>{w}.2f}" if d and d["n"] else f"{'-':>{w}}" * 2
        lines.append(f"{label:<12}" + cells)
    return "\n".join(lines)


# ---- CHAIR ------------------------------------------------------------------------------------------------

CHAIR_SYNONYMS = HERE / "benchdata" / "chair_synonyms.txt"
CHAIR_PROMPT = "Please describe this image in detail."  # the detail prompt CHAIR studies of LMMs use
# utils/chair.py:66-86 (LisaAnne/Hallucination at 6e4d33c): two-word objects read as one word,
# and qualifiers that would otherwise fire "person" ("baby bird" is a bird, "passenger jet" a jet).
_DOUBLE_WORDS = ["motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
                 "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
                 "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
                 "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
                 "stove top oven", "hot dog", "teddy bear", "home plate", "train track"]
_ANIMALS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub"]
_VEHICLES = ["jet", "train"]

# The original singularizes with pattern.en (not a dependency here): these rules and exceptions give
# the same singular for the plurals of the synonym list's words; a rare word may differ.
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "people", "mice": "mouse",
              "geese": "goose", "teeth": "tooth", "feet": "foot", "oxen": "oxen", "knives": "knife",
              "wolves": "wolf", "leaves": "leaf", "shelves": "shelf", "loaves": "loaf", "calves": "calf",
              "halves": "half", "scarves": "scarf", "buses": "bus", "tomatoes": "tomato", "potatoes": "potato",
              "buffaloes": "buffalo", "mangoes": "mango", "skis": "ski", "dice": "die", "cacti": "cactus",
              "ties": "tie", "pies": "pie", "cookies": "cookie", "movies": "movie", "brownies": "brownie"}
_UNINFLECTED = {"scissors", "sheep", "bison", "series", "species", "news", "pants", "jeans", "shorts", "cattle",
                "fish", "deer", "aircraft", "bus", "gas", "lens", "canvas", "christmas", "this", "was", "has", "his",
                "yes", "always", "perhaps"}


def singularize(w: str) -> str:
    if w in _UNINFLECTED or len(w) < 3:
        return w
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if w.endswith("men") and len(w) > 4:  # policemen, servicemen
        return w[:-3] + "man"
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return w[:-2]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


class Chair:
    """CHAIR's vocabulary: each object word and synonym -> its COCO object (utils/chair.py:53-86)."""

    def __init__(self, synonyms_file=CHAIR_SYNONYMS):
        # utils/chair.py:54-61, as written: a line is split on ", " after strip (so the list's
        # "scooter,  motor bike" yields " motor bike", which never matches: the original's quirk, kept).
        lines = [s.strip().split(", ") for s in Path(synonyms_file).read_text().splitlines() if s.strip()]
        self.objects = {s for line in lines for s in line}
        self.node = {s: line[0] for line in lines for s in line}
        self.double = {d: d for d in _DOUBLE_WORDS}
        for a in _ANIMALS:
            self.double[f"baby {a}"] = self.double[f"adult {a}"] = a
        for v in _VEHICLES:
            self.double[f"passenger {v}"] = v
        self.double.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})

    def words(self, caption: str) -> tuple[list[str], list[str]]:
        """(object words as written, their COCO objects) in order, duplicates kept (chair.py:98-135)."""
        ws = [singularize(w) for w in re.findall(r"[a-z]+", caption.lower())]
        merged, i = [], 0
        while i < len(ws):
            two = " ".join(ws[i:i + 2])
            if two in self.double:
                merged.append(self.double[two])
                i += 2
            else:
                merged.append(ws[i])
                i += 1
        if "toilet" in merged and "seat" in merged:  # "the seat of the toilet" is no chair
            merged = [w for w in merged if w != "seat"]
        found = [w for w in merged if w in self.objects]
        return found, [self.node[w] for w in found]

    def category(self, name: str, path, i) -> str:
        if name not in self.node:
            raise DataError(path, i, "categories", f"category {name!r} is not in the CHAIR synonym list")
        return self.node[name]


def coco_objects(chair: Chair, instances: str, captions: str = "") -> tuple[dict, dict]:
    """({image_id: set of COCO objects}, {image_id: file_name}) from an instances_*.json (segment
    annotations, chair.py:137-159) and, when given, a captions_*.json (objects named in the
    ground-truth captions also count as present, chair.py:161-179)."""
    path = Path(instances)
    data = _read_json(path)
    for k in ("images", "annotations", "categories"):
        if k not in data:
            raise DataError(path, field=k, msg="missing (expected COCO instances format)")
    names = {c["id"]: chair.category(c["name"], path, i) for i, c in enumerate(data["categories"])}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    objs: dict = {im: set() for im in files}
    for i, a in enumerate(data["annotations"]):
        if a.get("category_id") not in names:
            raise DataError(path, i, "category_id", f"{a.get('category_id')!r} is not a category of the file")
        objs.setdefault(a["image_id"], set()).add(names[a["category_id"]])
    if captions:
        cpath = Path(captions)
        cdata = _read_json(cpath)
        for i, a in enumerate(cdata.get("annotations", [])):
            _require(a, ("image_id", "caption"), cpath, i)
            if a["image_id"] in objs:
                objs[a["image_id"]].update(chair.words(a["caption"])[1])
    return objs, files


def read_image_ids(path) -> list:
    """Image ids from a JSON list or a text file with one id per line (ints where numeric)."""
    path = Path(path)
    text = path.read_text()
    try:
        ids = json.loads(text)
    except json.JSONDecodeError:
        ids = None
    if not isinstance(ids, list):  # not a JSON list (a one-line file "42" is JSON too): one id per line
        ids = [s.strip() for s in text.splitlines() if s.strip()]
    return [int(i) if isinstance(i, str) and i.isdigit() else i for i in ids]


def score_chair(chair: Chair, captions: list[tuple], objects: dict) -> dict:
    """CHAIR_i (hallucinated object mentions / mentions), CHAIR_s (captions with one / captions),
    recall (present objects mentioned / present objects, summed over captions) for (image_id,
    caption) pairs, and per caption what it mentioned and hallucinated (chair.py:190-260)."""
    found = [chair.words(c) for _, c in captions]
    present = []
    for im, _ in captions:
        if im not in objects:
            raise KeyError(f"image id {im!r} has no annotations (not in the instances file's images)")
        present.append(objects[im])
    m = chair_metrics([nodes for _, nodes in found], present)
    sentences = [{"image_id": im, "caption": c, "mentioned": nodes,
                  "hallucinated": [(w, n) for w, n in zip(ws, nodes) if n not in there], "gt_objects": sorted(there)}
                 for (im, c), (ws, nodes), there in zip(captions, found, present)]
    return {"chair_i": m["chair_i"], "chair_s": m["chair_s"], "recall": m["coverage"], "n": m["n"],
            "n_mentions": m["n_mentions"], "sentences": sentences}


def run_chair(generate_fn: GenerateFn, chair: Chair, objects: dict, files: dict, image_ids: list,
              prompt: str = CHAIR_PROMPT, batch_size: int = 16, progress: bool = False,
              out_dir: Optional[Path] = None, model_id: str = "model") -> dict:
    """Describe each image of ``image_ids``, then ``score_chair``; with ``out_dir`` the descriptions
    as ``captions_<model_id>.jsonl`` lines {"image_id", "caption"} (what CHAIR scripts read)."""
    missing = [i for i in image_ids if i not in files]
    if missing:
        raise KeyError(f"image ids {missing[:5]} are not in the annotations file's images")
    asked = [{"image": files[i], "question": prompt} for i in image_ids]
    responses = generate_all(generate_fn, asked, batch_size, progress, f"CHAIR {model_id}")
    caps = [(i, responses[(a["image"], a["question"])]) for i, a in zip(image_ids, asked)]
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"captions_{model_id}.jsonl").write_text(
            "".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in caps))
    return score_chair(chair, caps, objects)


def api_key(env_name: str) -> str:
    """The judge's key from the environment variable ``env_name`` ("" if unset: a local endpoint)."""
    return os.environ.get(env_name, "") if env_name else ""
