"""The published benchmarks from fixtures in their own formats, written here: POPE on a hand-labelled
file, the MMHal-Bench judge round trip against an endpoint on loopback, CHAIR on a hand-made COCO
annotations file, ShapesWorld's POPE export through the POPE path, and `factrl eval --benchmark pope`
on a tiny llava-hf checkpoint."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from micro import MICRO_MODEL

from factrl.trainers import benchmarks as B
from factrl.trainers.config import load_config

SUFFIX = "\nAnswer the question using a single word or phrase."


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fake(answers: dict, seen: list, strip: str = ""):
    """A generate_fn answering from {(image, question): answer}; records what it was asked."""

    def gen(items):
        seen.append(items)
        out = []
        for it in items:
            assert it["question"].endswith(strip)
            out.append(answers[(it["image"], it["question"][:len(it["question"]) - len(strip)])])
        return out

    return gen


# ---- POPE -------------------------------------------------------------------------------------------------
# (question_id, image, text, label, the model's answer, what summarize_eval_pope.py reads it as)
POPE = [(1, "a.jpg", "Is there a dog in the image?", "yes", "Yes, there is a dog.", "yes"),      # TP
        (2, "a.jpg", "Is there a cat in the image?", "no", "No, there is no cat.", "no"),         # TN
        (3, "b.jpg", "Is there a car in the image?", "yes", "Yes, a car.", "yes"),                # TP
        (4, "b.jpg", "Is there a bus in the image?", "no", "Yes.", "yes"),                        # FP
        (5, "c.jpg", "Is there a person in the image?", "yes", "There is a person, not a dog.", "no"),  # FN
        (6, "c.jpg", "Is there a cup in the image?", "no", "NO", "yes"),                          # FP: reads no "NO"
        (7, "d.jpg", "Is there a chair in the image?", "yes", "Yes. No doubt.", "yes"),           # TP: 1st sentence
        (8, "d.jpg", "Is there a bed in the image?", "no", "I do not think so", "no")]            # TN


def _pope_files(tmp_path):
    rand = _jsonl(tmp_path / "pope" / "coco_pope_random.jsonl",
                  [{"question_id": q, "image": im, "text": t, "label": lab} for q, im, t, lab, _, _ in POPE])
    adv = _jsonl(tmp_path / "pope" / "coco_pope_adversarial.jsonl",
                 [{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
                  {"question_id": 2, "image": "a.jpg", "text": "Is there a fork in the image?", "label": "no"}])
    answers = {(im, t): a for _, im, t, _, a, _ in POPE}
    answers[("a.jpg", "Is there a fork in the image?")] = "No"
    return {"random": rand, "adversarial": adv}, answers


def test_pope_parse_is_the_official_summarize_script():
    assert [B.pope_parse(a) for *_, a, _ in POPE] == [p for *_, p in POPE]
    assert B.pope_parse("no") == "no" and B.pope_parse("No") == "no" and B.pope_parse("no!") == "yes"


def test_pope_metrics_on_a_hand_labelled_file(tmp_path):
    files, answers = _pope_files(tmp_path)
    seen = []
    res = B.run_pope(_fake(answers, seen, SUFFIX), files, SUFFIX, batch_size=4, out_dir=tmp_path / "out",
                     model_id="m")
    # random: TP 3 (1, 3, 7), TN 2 (2, 8), FP 2 (4, 6), FN 1 (5)
    r = res["random"]
    assert (r["tp"], r["tn"], r["fp"], r["fn"], r["n"]) == (3, 2, 2, 1, 8)
    assert r["accuracy"] == pytest.approx(5 / 8) and r["precision"] == pytest.approx(3 / 5)
    assert r["recall"] == pytest.approx(3 / 4) and r["f1"] == pytest.approx(2 / 3)
    assert r["yes_ratio"] == pytest.approx(5 / 8)
    a = res["adversarial"]
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"], a["yes_ratio"]) == (1.0, 1.0, 1.0, 1.0, 0.5)
    # each distinct (image, question) asked once, batch_size at a time: 8 + the one new adversarial question
    assert [len(b) for b in seen] == [4, 4, 1]
    # the answers file summarize_eval_pope.py reads (model_vqa.py's lines), in the question file's order
    lines = [json.loads(s) for s in (tmp_path / "out" / "answers_m_random.jsonl").read_text().splitlines()]
    assert [x["question_id"] for x in lines] == list(range(1, 9))
    assert [x["text"] for x in lines] == [a for *_, a, _ in POPE]
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert B.run_pope(_fake(answers, [], SUFFIX), files, SUFFIX, max_items=2)["random"]["n"] == 2


def test_pope_file_errors_name_the_record(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", [{"question_id": 1, "image": "a.jpg", "text": "Is there?", "label": "yes"},
                                        {"question_id": 2, "image": "a.jpg", "label": "no"}])
    with pytest.raises(ValueError, match="record 1: field 'text': missing"):
        B.load_pope(p)
    _jsonl(p, [{"question_id": 1, "image": "a.jpg", "text": "Is there?", "label": "maybe"}])
    with pytest.raises(ValueError, match="field 'label'"):
        B.load_pope(p)


# ---- MMHal-Bench ------------------------------------------------------------------------------------------
MMHAL = [{"question_type": "attribute", "question_topic": "animal", "image_id": "i0",
          "image_src": "https://example.org/x/a0.jpg", "image_content": ["Dog", "Grass"],
          "question": "What color is the dog?", "gt_answer": "The dog is brown."},
         {"question_type": "adversarial", "question_topic": "vehicle", "image_id": "i1",
          "image_src": "https://example.org/x/a1.jpg", "image_content": ["Car"],
          "question": "What is the man in the car holding?", "gt_answer": "There is no man in the car."},
         {"question_type": "attribute", "question_topic": "food", "image_id": "i2",
          "image_src": "https://example.org/x/a2.jpg", "image_content": ["Cake", "Table"],
          "question": "What flavour is the cake?", "gt_answer": "It is a chocolate cake."},
         {"question_type": "counting", "question_topic": "animal", "image_id": "i3",
          "image_src": "https://example.org/x/a3.jpg", "image_content": ["Cat", "Cat"],
          "question": "How many cats are there?", "gt_answer": "There are two cats."}]
ANSWERS = ["The dog is brown.", "He holds a phone.", "Vanilla.", "Two cats."]
# the judge's reply per question: rating 5; 2; two ratings (unreadable: 0, as the script); "rating: 6"
REPLIES = {"What color is the dog?": "Accurate and informative.\nRating: 5, very informative, no hallucination",
           "What is the man in the car holding?": "There is no man.\nRating: 2, very informative, with hallucination",
           "What flavour is the cake?": "Unclear. Rating: 1 or Rating: 4",
           "How many cats are there?": "Correct. rating: 6"}


class _Judge(BaseHTTPRequestHandler):
    requests: list = []
    fail_first = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, self.headers.get("Authorization"), body))
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(500)
            self.end_headers()
            return
        prompt = body["messages"][0]["content"]
        q = prompt.split("### Question\n")[1].split("\n")[0]
        reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLIES[q]},
                              "finish_reason": "stop"}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge():
    _Judge.requests, _Judge.fail_first = [], 0
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _Judge
    server.shutdown()
    server.server_close()


def _mmhal_folder(tmp_path):
    (tmp_path / "mmhal").mkdir()
    (tmp_path / "mmhal" / "response_template.json").write_text(json.dumps(MMHAL, indent=2))
    return tmp_path / "mmhal"


def test_mmhal_responses_are_the_template_with_model_answer(tmp_path):
    recs = B.load_mmhal(_mmhal_folder(tmp_path) / "response_template.json")
    seen = []
    answers = {(f"a{i}.jpg", r["question"]): a for i, (r, a) in enumerate(zip(MMHAL, ANSWERS))}
    out = B.mmhal_responses(_fake(answers, seen), recs, batch_size=3)
    assert out == [{**r, "model_answer": a} for r, a in zip(MMHAL, ANSWERS)]  # every published field kept
    assert [it["image"] for b in seen for it in b] == ["a0.jpg", "a1.jpg", "a2.jpg", "a3.jpg"]  # image_src's name
    (tmp_path / "bad.json").write_text(json.dumps([{k: v for k, v in MMHAL[0].items() if k != "gt_answer"}]))
    with pytest.raises(ValueError, match="record 0: field 'gt_answer': missing"):
        B.load_mmhal(tmp_path / "bad.json")


def test_mmhal_judge_round_trip_on_loopback(tmp_path, judge, monkeypatch, capsys):
    from factrl.trainers.eval_stage import evaluate_stages

    url, server = judge
    server.fail_first = 1  # the first request fails: retried
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sekret")
    answered = tmp_path / "answered.json"
    answered.write_text(json.dumps([{**r, "model_answer": a} for r, a in zip(MMHAL, ANSWERS)], indent=2))
    cfg = load_config("tiny", [f"run.out_dir={tmp_path}/run", "eval.benchmark=mmhal",
                               f"eval.mmhal.responses={answered}", f"eval.judge.base_url={url}",
                               "eval.judge.model=judge-x", "eval.judge.api_key_env=FAKE_JUDGE_KEY",
                               "eval.judge.retry_wait_s=0", "run.progress=false"])
    summary = evaluate_stages(cfg)["answered"]
    # the requests: 1 failed + 4, each the benchmark's prompt for its record, temperature 0, the key
    assert len(server.requests) == 5
    for (path, auth, body), (r, a) in zip(server.requests[1:], zip(MMHAL, ANSWERS)):
        assert path == "/v1/chat/completions" and auth == "Bearer sekret"
        assert body["model"] == "judge-x" and body["temperature"] == 0.0 and len(body["messages"]) == 1
        prompt = body["messages"][0]["content"]
        assert prompt.startswith("Please act as an impartial and objective judge and evaluate the quality")
        assert "- Rating: 3, not informative, no hallucination\n" in prompt
        assert prompt.endswith(f"### Image Contents\n{', '.join(r['image_content'])}\n\n### Question\n{r['question']}"
                               f"\n\n### Standard Human-Generated Answer\n{r['gt_answer']}\n\n"
                               f"### LMM Response to Evaluate\n{a}\n")
    # ratings 5, 2, 0 (two found), 6: mean 13/4; hallucination = rating < 3: 2 of 4
    assert summary["score"] == pytest.approx(3.25) and summary["hallucination_rate"] == 0.5 and summary["n"] == 4
    assert summary["per_type"] == {"attribute": {"score": 2.5, "hallucination_rate": 0.5, "n": 2},
                                   "adversarial": {"score": 2.0, "hallucination_rate": 1.0, "n": 1},
                                   "counting": {"score": 6.0, "hallucination_rate": 0.0, "n": 1}}
    out = tmp_path / "run" / "eval" / "mmhal"
    reviews = json.loads((out / "reviews_answered.json").read_text())  # what summarize_gpt_mmhal.py reads
    assert [rv["choices"][0]["message"]["content"] for rv in reviews] == [REPLIES[r["question"]] for r in MMHAL]
    table = (out / "table.txt").read_text()
    assert "attribute" in table and "counting" in table and "3.25" in table
    assert "zero or several ratings" in capsys.readouterr().err


def test_mmhal_without_a_judge_writes_responses_and_says_how_to_score(tmp_path, capsys):
    from factrl.trainers.eval_stage import evaluate_stages

    answered = tmp_path / "answered.json"
    answered.write_text(json.dumps([{**r, "model_answer": a} for r, a in zip(MMHAL, ANSWERS)]))
    cfg = load_config("tiny", [f"run.out_dir={tmp_path}/run", "eval.benchmark=mmhal",
                               f"eval.mmhal.responses={answered}"])
    res = evaluate_stages(cfg)
    written = tmp_path / "run" / "eval" / "mmhal" / "responses_answered.json"
    assert res == {"answered": {"responses": str(written), "judged": False}}
    assert json.loads(written.read_text()) == json.loads(answered.read_text())
    said = capsys.readouterr().out
    assert "eval.judge.base_url" in said and f"eval.mmhal.responses={written}" in said and "eval_gpt_mmhal.py" in said


def test_parse_rating_is_the_scripts():
    assert B.parse_rating("...\nRating: 4, somewhat informative") == 4
    assert B.parse_rating("RATING: 0") == 0
    assert B.parse_rating("no rating here") is None and B.parse_rating("Rating: 2. Rating: 5") is None


# ---- CHAIR ------------------------------------------------------------------------------------------------
def _coco(tmp_path):
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"},
            {"id": 67, "name": "dining table"}, {"id": 62, "name": "chair"}]
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2, 3)]
    ann = [(1, 1), (1, 18), (1, 18), (2, 3), (2, 67), (3, 62)]  # (image_id, category_id)
    inst = {"images": images, "categories": cats,
            "annotations": [{"id": k, "image_id": i, "category_id": c} for k, (i, c) in enumerate(ann)]}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "instances_val2014.json").write_text(json.dumps(inst))
    caps = {"annotations": [{"id": 1, "image_id": 3, "caption": "A cat sleeping on a wooden chair."}]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(caps))
    return tmp_path / "instances_val2014.json", tmp_path / "captions_val2014.json"


DESCRIPTIONS = {1: "A man walks two dogs past a parked car.",      # person, dog, car: car is not there
                2: "There is a car and a dining table.",            # car, dining table ("table"): both there
                3: "A kitten sleeps on the seat of the toilet."}    # cat, toilet ("seat" of a toilet is no chair)


def test_chair_words_follow_the_original_rules():
    c = B.Chair()
    assert c.words(DESCRIPTIONS[1]) == (["man", "dog", "car"], ["person", "dog", "car"])
    assert c.words(DESCRIPTIONS[3])[1] == ["cat", "toilet"]
    assert c.words("Two wine glasses, a hot dog and a baby bird.")[1] == ["wine glass", "hot dog", "bird"]
    assert c.words("Policemen on motorbikes beside a sofa.")[1] == ["person", "motorcycle", "couch"]
    assert c.words("A person and a person.")[1] == ["person", "person"]  # every mention counts for CHAIR_i


def test_chair_on_hand_made_annotations(tmp_path):
    inst, caps = _coco(tmp_path)
    chair = B.Chair()
    names = {i: f"COCO_val2014_{i:012d}.jpg" for i in (1, 2, 3)}
    answers = {(names[i], B.CHAIR_PROMPT): d for i, d in DESCRIPTIONS.items()}
    (tmp_path / "ids.txt").write_text("1\n2\n3\n")
    ids = B.read_image_ids(tmp_path / "ids.txt")
    (tmp_path / "one.txt").write_text("42\n")
    assert ids == [1, 2, 3] and B.read_image_ids(tmp_path / "one.txt") == [42]

    # with the captions (as the original): image 3 has a chair and a cat
    objects, files = B.coco_objects(chair, inst, caps)
    assert objects == {1: {"person", "dog"}, 2: {"car", "dining table"}, 3: {"chair", "cat"}} and files == names
    r = B.run_chair(_fake(answers, []), chair, objects, files, ids, out_dir=tmp_path / "out", model_id="m")
    # 7 mentions, 2 hallucinated (car in 1, toilet in 3); 2 of 3 captions; 5 of 6 present objects named
    assert (r["chair_i"], r["chair_s"], r["recall"], r["n"], r["n_mentions"]) == \
        (pytest.approx(2 / 7), pytest.approx(2 / 3), pytest.approx(5 / 6), 3, 7)
    assert [s["hallucinated"] for s in r["sentences"]] == [[("car", "car")], [], [("toilet", "toilet")]]
    lines = [json.loads(s) for s in (tmp_path / "out" / "captions_m.jsonl").read_text().splitlines()]
    assert lines == [{"image_id": i, "caption": DESCRIPTIONS[i]} for i in (1, 2, 3)]

    # instances only: image 3 has just a chair, so the kitten is hallucinated too
    objects, _ = B.coco_objects(chair, inst)
    r = B.score_chair(chair, [(i, DESCRIPTIONS[i]) for i in (1, 2, 3)], objects)
    assert (r["chair_i"], r["chair_s"], r["recall"]) == (pytest.approx(3 / 7), pytest.approx(2 / 3),
                                                         pytest.approx(4 / 5))


def test_chair_synonyms_are_the_papers_list():
    lines = B.CHAIR_SYNONYMS.read_text().splitlines()
    assert len(lines) == 80 and lines[0].startswith("person, girl, boy, man, woman") and lines[-1] == "toothbrush"
    c = B.Chair()
    assert len({c.node[w] for w in c.objects}) == 80  # the 80 COCO objects
    assert c.node["hydrant"] == "fire hydrant" and c.node["iPhone"] == "cell phone"


# ---- ShapesWorld's POPE sets through the POPE path (issue item 7) -------------------------------------------
def test_shapesworld_pope_export_scores_as_the_builtin_scorer(tmp_path):
    from factrl.trainers.data import text_corpus
    from factrl.trainers.shapesworld.dataset import POPE_FILE, POPE_SPLITS, write_dataset
    from factrl.trainers.shapesworld.scoring import blind_answers, run_eval

    root = tmp_path / "data"
    write_dataset(root, n=48, seed=0)
    sets = {s: json.loads((root / "eval" / f"pope_{s}.json").read_text()) for s in POPE_SPLITS}
    files = {s: root / POPE_FILE.format(split=s) for s in POPE_SPLITS}
    for s in POPE_SPLITS:  # the official format, item for item
        recs = B.load_pope(files[s])
        assert [(r["question_id"], r["image"], r["text"], r["label"]) for r in recs] == \
            [(i + 1, it["image"], it["question"], it["label"]) for i, it in enumerate(sets[s])]
    truth = {(it["image"], it["question"]): it["answer"] for items in sets.values() for it in items}
    flip = {"yes": "No, there is not.", "no": "Yes, there is."}
    wrong = {k: flip["yes" if a.startswith("Yes") else "no"] for k, a in truth.items()}
    mixed = {k: (truth[k] if i % 3 else wrong[k]) for i, k in enumerate(truth)}
    with open(root / "sft.json") as f:
        blind = blind_answers(json.load(f))
    gens = [lambda items, a=answers: [a[(it["image"], it["question"])] for it in items]
            for answers in (truth, wrong, mixed)] + [blind]
    for gen in gens:
        ours = B.run_pope(gen, files, suffix="")  # the world's questions were trained without POPE's suffix
        builtin = run_eval(gen, root, progress=False, only=[f"pope_{s}" for s in POPE_SPLITS])["pope"]
        assert ours == builtin and set(ours) == set(POPE_SPLITS)
    mixed_scores = B.run_pope(gens[2], files, suffix="")["adversarial"]
    assert min(mixed_scores[k] for k in ("tp", "tn", "fp", "fn")) > 0  # every cell filled: no trivial agreement
    # the .jsonl files stay out of the tiny tokenizer's corpus (text_corpus reads *.json): same corpus without them
    with_pope = list(text_corpus(root))
    for f in files.values():
        f.unlink()
    assert list(text_corpus(root)) == with_pope


# ---- the command line on a tiny llava-hf checkpoint -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from factrl.model.tiny import build_tiny_checkpoint
    from factrl.trainers.config import TinyModelConfig

    tiny = load_config("tiny", MICRO_MODEL).model.tiny
    texts = ["USER: Is there a dog in the image? ASSISTANT: Yes, there is a dog.", "No, there is no cat."] * 5
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", TinyModelConfig(**tiny.__dict__), texts)


def _images(folder, names):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):  # not square: the loader pads them as LLaVA does
        Image.new("RGB", (64, 40), (60 * i % 256, 200 - 40 * i % 200, 90)).save(folder / name)


def _eval_cli(benchmark, ckpt, tmp_path, *extra):
    from factrl.trainers.cli import main

    return main(["eval", "--benchmark", benchmark, *MICRO_MODEL, f"model.checkpoint={ckpt}",
                 f"run.out_dir={tmp_path / 'run'}", "run.device=cpu", "eval.max_new_tokens=5", "eval.batch_size=3",
                 *extra])


def test_factrl_eval_benchmark_pope_runs_on_a_tiny_checkpoint(tiny_ckpt, tmp_path, capsys):
    files, _ = _pope_files(tmp_path)
    _images(tmp_path / "pope" / "images", ("a.jpg", "b.jpg", "c.jpg", "d.jpg"))
    rc = _eval_cli("pope", tiny_ckpt, tmp_path, f"eval.pope.folder={tmp_path / 'pope'}",
                   "eval.pope.splits=[random,adversarial]")
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "run" / "eval" / "pope"
    assert set(summary) == {"sft"} and set(summary["sft"]) == {"random", "adversarial"}
    for split, f in files.items():  # the numbers are the answers file's, read as the official script reads it
        answers = [json.loads(s) for s in (out / f"answers_sft_{split}.jsonl").read_text().splitlines()]
        labels = B.load_pope(f)
        assert [a["question_id"] for a in answers] == [r["question_id"] for r in labels]
        assert summary["sft"][split] == B.score_pope(labels, [a["text"] for a in answers])
        assert summary["sft"][split]["n"] == len(labels)
    assert "POPE F1 random" in (out / "table.txt").read_text()
    assert json.loads((out / "summary.json").read_text()) == summary


def test_factrl_eval_benchmark_mmhal_and_chair_run_on_a_tiny_checkpoint(tiny_ckpt, tmp_path, judge, capsys):
    # MMHal-Bench: responses written, then judged on loopback
    folder = _mmhal_folder(tmp_path)
    _images(folder / "images", [f"a{i}.jpg" for i in range(4)])
    assert _eval_cli("mmhal", tiny_ckpt, tmp_path, f"eval.mmhal.folder={folder}") == 0
    out = tmp_path / "run" / "eval" / "mmhal"
    responses = json.loads((out / "responses_sft.json").read_text())
    assert [{k: v for k, v in r.items() if k != "model_answer"} for r in responses] == MMHAL
    assert all(isinstance(r["model_answer"], str) for r in responses)
    assert "no judge configured" in capsys.readouterr().out
    url, server = judge
    # the command it prints: the written file judged as it is, without a model
    assert _eval_cli("mmhal", tiny_ckpt, tmp_path, f"eval.mmhal.responses={out / 'responses_sft.json'}",
                     f"eval.judge.base_url={url}") == 0
    assert len(server.requests) == 4 and (out / "reviews_sft.json").is_file()
    assert json.loads((out / "responses_sft.json").read_text()) == responses
    server.requests.clear()
    assert _eval_cli("mmhal", tiny_ckpt, tmp_path, f"eval.mmhal.folder={folder}", f"eval.judge.base_url={url}",
                     "eval.max_items=2") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sft"]
    assert len(server.requests) == 2 and (summary["score"], summary["n"]) == (3.5, 2)  # ratings 5 and 2
    assert server.requests[1][2]["messages"][0]["content"].endswith(
        f"### LMM Response to Evaluate\n{json.loads((out / 'responses_sft.json').read_text())[1]['model_answer']}\n")

    # CHAIR: descriptions of the listed images, scored against the annotations
    inst, caps = _coco(tmp_path / "coco")
    _images(tmp_path / "coco" / "val2014", [f"COCO_val2014_{i:012d}.jpg" for i in (1, 2, 3)])
    (tmp_path / "ids.json").write_text("[3, 1]")
    assert _eval_cli("chair", tiny_ckpt, tmp_path, f"eval.chair.annotations={inst}", f"eval.chair.captions={caps}",
                     f"eval.chair.image_folder={tmp_path / 'coco' / 'val2014'}",
                     f"eval.chair.image_ids={tmp_path / 'ids.json'}") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sft"]
    written = tmp_path / "run" / "eval" / "chair" / "captions_sft.jsonl"
    lines = [json.loads(s) for s in written.read_text().splitlines()]
    assert [x["image_id"] for x in lines] == [3, 1] and summary["n"] == 2
    objects, _ = B.coco_objects(B.Chair(), inst, caps)
    again = B.score_chair(B.Chair(), [(x["image_id"], x["caption"]) for x in lines], objects)
    keys = ("chair_i", "chair_s", "recall", "n_mentions")
    assert {k: summary[k] for k in keys} == {k: again[k] for k in keys}


def test_benchmark_config_errors_name_the_key(tmp_path):
    from factrl.trainers.cli import main

    rc = main(["eval", "--benchmark", "pope", "model.checkpoint=unused", f"run.out_dir={tmp_path}"])
    assert rc == 2  # factrl: config error: POPE needs eval.pope.folder ...
    rc = main(["eval", "--benchmark", "pope", "model.checkpoint=unused", f"eval.pope.folder={tmp_path}"])
    assert rc == 2
