"""LLaVA-RLHF formats: loaders, vicuna_v1 rendering, label masks, bad input, images, collators."""

import json
import os
import random
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from factrl.model.tokenizer import build_tokenizer
from factrl.trainers import data as D
from factrl.trainers import rm_prompt
from factrl.trainers.config import load_config

NIT = 4  # image tokens per image in these tests
SYS = D.SYSTEM_PROMPT

SFT = [
    {
        "id": "a",
        "image": "img1.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the circle?"},
            {"from": "gpt", "value": "The circle is red."},
        ],
    },
    {
        "id": "b",
        "image": "img2.png",
        "conversations": [  # multi-turn, placeholder after the text (LLaVA moves it to the front)
            {"from": "human", "value": "What is here?\n<image>"},
            {"from": "gpt", "value": "A star."},
            {"from": "human", "value": "Is it big?"},
            {"from": "gpt", "value": "No."},
        ],
    },
    {
        "id": "c",
        "conversations": [  # text-only
            {"from": "human", "value": "Hello there"},
            {"from": "gpt", "value": "Hi."},
        ],
    },
    {
        "image": "img1.png",
        "conversations": [  # image but no placeholder: LLaVA puts it in front
            {"from": "human", "value": "Describe it."},
            {"from": "gpt", "value": "A red circle."},
        ],
    },
]
CAPTIONS = {
    "img1.png": ["A red circle is at the top.", "The background is white."],
    "aok_img1.png": ["The correct option is B: red."],
    "img2.png": "A big blue star.",
}  # a lone string is one caption
PREF = [
    {
        "id": "p0",
        "image": "img1.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the circle?"},
            {"from": "gpt", "value": "The circle is red."},
        ],
        "output_1": {"value": "The circle is blue."},
        "output_2": {"value": "The circle is red."},
        "preference": 2,
    },  # no "hallucination" key
    {
        "id": "p1",
        "image": "img2.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is here?"},
            {"from": "gpt", "value": "A star."},
            {"from": "human", "value": "Is it big?"},
        ],  # ends with the human turn
        "output_1": {"value": "Yes."},
        "output_2": {"value": "No."},
        "preference": 1,
        "hallucination": True,
    },
    {
        "id": "p2",
        "conversations": [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi."}],
        "output_1": {"value": "Hi."},
        "output_2": {"value": "Go away."},
        "preference": 1,
        "hallucination": False,
    },
]
PPO = [
    {
        "id": f"q{ct}",
        "image": "img1.png" if ct % 2 else None,
        "conversations": [{"from": "human", "value": f"Question number {ct}?"}],
        "caption_type": ct,
        "length_bonus": 0.5 * ct,
    }
    for ct in range(1, 8)
]
for r in PPO:
    if r["image"] is None:
        del r["image"]


@pytest.fixture(scope="module")
def tok():
    texts = [SYS, "USER: ASSISTANT:", *(rm_prompt.load_template(n, f) for n in ("factrl", "original") for f in (1, 0))]
    texts += [t["value"] for r in SFT + PREF + PPO for t in r["conversations"]]
    texts += [r[k]["value"] for r in PREF for k in ("output_1", "output_2")]
    texts += [c for v in CAPTIONS.values() for c in ([v] if isinstance(v, str) else v)]
    return build_tokenizer(texts * 3, vocab_size=400)


@pytest.fixture()
def root(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "images" / "img1.png")
    Image.new("RGB", (10, 10), (0, 0, 255)).save(tmp_path / "images" / "img2.png")
    for name, obj in (("sft.json", SFT), ("pref.json", PREF), ("ppo.json", PPO), ("caps.json", CAPTIONS)):
        (tmp_path / name).write_text(json.dumps(obj))
    return tmp_path


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ---- formats and rendering --------------------------------------------------------------------


def test_sft_labels_mask_exactly_the_assistant_tokens(tok, root):
    exs = D.load_sft(root / "sft.json", tok, NIT, 1000, image_folder=str(root / "images"))
    assert [e.id for e in exs] == ["a", "b", "c", "3"] and exs.stats.n_loaded == 4
    img, bos, eos, M = tok.convert_tokens_to_ids("<image>"), tok.bos_token_id, tok.eos_token_id, -100
    e = exs[1]
    parts = [
        ([bos], False),
        (enc(tok, f"{SYS} USER:"), False),
        ([img] * NIT, False),  # moved to the front of the turn, as LLaVA does
        (enc(tok, "What is here? ASSISTANT:"), False),
        (enc(tok, "A star.") + [eos], True),
        (enc(tok, "USER: Is it big? ASSISTANT:"), False),
        (enc(tok, "No.") + [eos], True),
    ]
    want_ids = [t for p, _ in parts for t in p]
    want_labels = [t if train else M for p, train in parts for t in p]
    assert e.input_ids == want_ids
    assert e.labels == want_labels  # token by token
    assert e.image == "img2.png"
    # the trained tokens decode to exactly the two answers
    trained = [t for t, l in zip(e.input_ids, e.labels) if l != M]
    assert trained == enc(tok, "A star.") + [eos] + enc(tok, "No.") + [eos]
    # text-only: no image tokens at all
    assert img not in exs[2].input_ids and exs[2].image is None
    assert exs[2].input_ids == [bos] + enc(tok, f"{SYS} USER: Hello there ASSISTANT:") + enc(tok, "Hi.") + [
        eos
    ]
    # a record with an image but no placeholder gets the image tokens in front of the text
    assert exs[3].input_ids[: len(enc(tok, f"{SYS} USER:")) + 1 + NIT][-NIT:] == [img] * NIT
    assert exs[0].input_ids.count(img) == NIT


def test_sft_too_long_dropped_and_counted(tok, root):
    full = D.load_sft(root / "sft.json", tok, NIT, 1000)
    limit = sorted(len(e.input_ids) for e in full)[1]
    exs = D.load_sft(root / "sft.json", tok, NIT, limit)
    assert all(len(e.input_ids) <= limit for e in exs)
    assert exs.stats.n_too_long == sum(len(e.input_ids) > limit for e in full) > 0
    assert len(exs) + exs.stats.n_too_long == 4


def test_captions_with_aok(root):
    caps = D.load_captions(root / "caps.json")
    assert caps["aok_img1.png"] == ["The correct option is B: red."]
    assert caps["img2.png"] == ["A big blue star."]


@given(st.lists(st.text(max_size=4), min_size=2, max_size=8, unique=True))
def test_other_scenes_captions_gives_every_image_another_images_captions(keys):
    caps = D.Captions({k: [f"caption of {k}"] for k in reversed(keys)})
    caps.file = "caps.json"
    other = D.other_scenes_captions(caps)
    assert set(other) == set(caps) and all(other[k] != caps[k] for k in caps)  # no image keeps its own
    assert sorted(map(tuple, other.values())) == sorted(map(tuple, caps.values()))  # the same captions, moved
    assert other.file.startswith("caps.json") and "rotated" in other.file  # errors say these are not the file's


def test_preferences_fact_augmented_and_vanilla(tok, root):
    caps = D.load_captions(root / "caps.json")
    exs = D.load_preferences(root / "pref.json", tok, NIT, 1000, caps, fact_augmented=True, template="factrl", seed=5)
    assert [e.hallucination for e in exs] == [None, True, False]
    e0 = exs[0]
    prefix = (
        [tok.bos_token_id]
        + enc(tok, f"{SYS} USER:")
        + [tok.convert_tokens_to_ids("<image>")] * NIT
        + enc(tok, "What color is the circle? ASSISTANT:")
    )
    # RM training reads the image's captions only (no aok_), shuffled per output by the seeded RNG,
    # and every response ends with EOS before the prompt (as the original's vicuna "</s>")
    rng = random.Random(5)
    t = rm_prompt.load_template("factrl", True)
    s1, s2 = rm_prompt.render(t, CAPTIONS["img1.png"], rng), rm_prompt.render(t, CAPTIONS["img1.png"], rng)
    eos = [tok.eos_token_id]
    assert e0.chosen_ids == prefix + enc(tok, "The circle is red.") + eos + enc(tok, s2)  # preference 2
    assert e0.rejected_ids == prefix + enc(tok, "The circle is blue.") + eos + enc(tok, s1)
    assert e0.chosen_suffix_len == len(enc(tok, s2))  # the chosen output's RM prompt (rm.facts_lm_coef)
    assert e0.rejected_suffix_len == len(enc(tok, s1))  # the rejected one's (rm.score_pool=suffix)
    tail = tok.decode(e0.chosen_ids[-12:])
    assert tail.rstrip().endswith("the quality score of my last response is")
    assert "The correct option is B" not in tok.decode(e0.chosen_ids)
    again = D.load_preferences(root / "pref.json", tok, NIT, 1000, caps, True, template="factrl", seed=5)
    assert [e.chosen_ids for e in again] == [e.chosen_ids for e in exs]  # reproducible by seed
    # shuffle_captions=False: the captions file's order, the same for both outputs. Seed 1, whose
    # shuffles reverse both outputs' captions (seed 5's keep the file's order: it could not tell)
    s0 = rm_prompt.render(t, CAPTIONS["img1.png"])
    assert s0.index("A red circle") < s0.index("The background")
    shuffled = D.load_preferences(root / "pref.json", tok, NIT, 1000, caps, True, template="factrl", seed=1)
    fixed = D.load_preferences(root / "pref.json", tok, NIT, 1000, caps, True, template="factrl", seed=1,
                               shuffle_captions=False)
    for got, out in ((lambda e: e.chosen_ids, "The circle is red."), (lambda e: e.rejected_ids, "The circle is blue.")):
        want = prefix + enc(tok, out) + eos + enc(tok, s0)
        assert got(fixed[0]) == want and got(shuffled[0]) != want
    # multi-turn: the earlier gpt turn stays (with its eos), the outputs follow the last question
    e1 = exs[1]
    assert e1.chosen_ids.count(tok.eos_token_id) == 2  # the earlier turn's and the output's
    assert tok.decode(e1.chosen_ids).count("A big blue star.") == 1
    # text-only record: no captions, the fact block is empty
    assert "circle is at the top" not in tok.decode(exs[2].chosen_ids)
    van = D.load_preferences(root / "pref.json", tok, NIT, 1000, None, fact_augmented=False, template="factrl")
    vt = tok.decode(van[0].chosen_ids)
    assert "A red circle is at the top." not in vt and vt.rstrip().endswith(
        "the quality score of my last response is"
    )
    assert van[0].chosen_ids[: len(prefix)] == prefix


def test_custom_template_file_and_text(tok, root, tmp_path):
    caps = D.load_captions(root / "caps.json")
    p = tmp_path / "t.txt"
    p.write_text("USER: Facts:\n{captions}\nASSISTANT: so the quality score of my last response is\n")
    a = D.load_preferences(root / "pref.json", tok, NIT, 1000, caps, True, template=str(p))
    b = D.load_preferences(root / "pref.json", tok, NIT, 1000, caps, True, template=p.read_text())
    assert a[0].chosen_ids == b[0].chosen_ids
    assert "Facts:" in tok.decode(a[0].chosen_ids)
    with pytest.raises(ValueError, match="placeholder"):
        D.load_preferences(
            root / "pref.json", tok, NIT, 1000, caps, True, template="USER: no block\nASSISTANT: x"
        )


def test_build_rm_input_matches_rm_training_layout(tok, root):
    caps = D.load_captions(root / "caps.json")
    exs = D.load_preferences(root / "pref.json", tok, NIT, 1000, caps, fact_augmented=True, seed=1)
    q = D.render_query(tok, "What color is the circle?", NIT, has_image=True)
    rng = random.Random(1)
    t = rm_prompt.load_template("", True)
    rm_prompt.render(t, caps["img1.png"], rng)  # output_1's draw
    prompt = rm_prompt.render(t, caps["img1.png"], rng)  # output_2, the chosen one
    resp = enc(tok, "The circle is red.") + [tok.eos_token_id, tok.pad_token_id]  # generated, stopped, padded
    left_padded_q = [tok.pad_token_id] * 3 + q
    assert D.build_rm_input(tok, left_padded_q, resp, prompt) == exs[0].chosen_ids
    van = D.load_preferences(root / "pref.json", tok, NIT, 1000, None, fact_augmented=False)
    assert D.build_rm_input(tok, q, resp, rm_prompt.load_template("", False)) == van[0].chosen_ids
    # a response that did not stop (no EOS, e.g. cut at "?") reaches the RM prompt without one
    cut = D.build_rm_input(tok, q, enc(tok, "The circle is red."), prompt)
    assert cut == [x for j, x in enumerate(exs[0].chosen_ids) if j != len(q) + len(enc(tok, "The circle is red."))]


def test_original_fact_prompt_renders_exactly():
    """The recipe's template file, FACTUAL_PROMPT and bullets (RLHF/prompts/fact_rlhf_reward_prompt.txt,
    RLHF/data_utils/constants.py:19, common_utils.py:383-388), captions shuffled by the seed."""
    t = rm_prompt.load_template("original", True)
    assert t.startswith("USER: Please evaluate the quality of your last response.") and "{factual_prompt}" in t
    caps = ["c1.", "c2.", "c3."]
    got = rm_prompt.render(t, caps, random.Random(0))
    order = caps[:]
    random.Random(0).shuffle(order)
    assert order != caps  # seed 0 does move them
    bullets = "".join(f"  - {c}\n" for c in order)
    want = ("USER: Please evaluate the quality of your last response. There are several dimensions you should "
            "consider in your evaluation:\n\n1. Accurate: The AI should provide factual and accurate information "
            "from the image, and refrain from making statements that are not supported by the image or "
            "inconsistent with the image. Specifically, the AI's response should be fully supported by the "
            f"combination of the following captions:\n{bullets}\n2. Helpful: The AI\u2019s response should "
            "precisely serve the user's needs and interests, while grounding the response in the image.\n"
            "3. Language Natural: The AI should employ language that flows smoothly and is free from repetitive "
            "or awkward constructs.\n4. Concise: The AI should efficiently address the task or answer the "
            "question, communicating the necessary information with brevity and clarity.\n\nA good response "
            "should be accurate, helpful, language natural, and concise. ASSISTANT: Following your definitions, "
            "the quality score of my last response is")
    assert got == want
    assert rm_prompt.render(t, caps, random.Random(0)) == got and rm_prompt.render(t, caps, random.Random(1)) != got
    assert "{factual_prompt}" not in rm_prompt.load_template("original", False)  # the vanilla file
    # which captions: aok_ only for caption_type 2-5, the image's own for 1/6/7 and RM training
    assert [rm_prompt.fact_key("x.jpg", c) for c in (None, 1, 2, 5, 6, 7)] == \
        ["x.jpg", "x.jpg", "aok_x.jpg", "aok_x.jpg", "x.jpg", "x.jpg"]


def test_render_query_is_the_sft_prefix(tok, root):
    exs = D.load_sft(root / "sft.json", tok, NIT, 1000)
    q = D.render_query(tok, "<image>\nWhat color is the circle?", NIT, has_image=True)
    assert exs[0].input_ids[: len(q)] == q and exs[0].labels[: len(q)] == [-100] * len(q)
    assert q[-len(enc(tok, "ASSISTANT:")) :] == enc(tok, "ASSISTANT:")
    assert D.render_query(tok, "What color is the circle?", NIT, has_image=True) == q
    with pytest.raises(ValueError):
        D.render_query(tok, "<image> hi", NIT, has_image=False)


def test_ppo_prompts_every_caption_type(tok, root):
    caps = D.load_captions(root / "caps.json")
    exs = D.load_ppo_prompts(root / "ppo.json", tok, NIT, 1000, caps, image_folder=str(root / "images"))
    assert [e.caption_type for e in exs] == list(range(1, 8))
    assert [e.length_bonus for e in exs] == [0.5 * c for c in range(1, 8)]
    for e in exs:
        assert e.query_ids[-len(enc(tok, "ASSISTANT:")) :] == enc(tok, "ASSISTANT:")
        if e.image:  # the aok_ truth for the multiple-choice types 2-5, else the image's captions
            want = CAPTIONS["aok_img1.png"] if 2 <= e.caption_type <= 5 else CAPTIONS["img1.png"]
            assert e.captions == want
            assert e.query_ids.count(tok.convert_tokens_to_ids("<image>")) == NIT
        else:
            assert e.captions == [] and tok.convert_tokens_to_ids("<image>") not in e.query_ids
    # prompts longer than max_prompt_len TEXT tokens (image positions excluded) are dropped and counted
    text_len = lambda e: len(e.query_ids) - (NIT if e.image else 0)  # noqa: E731
    n = text_len(exs[1])
    short = D.load_ppo_prompts(root / "ppo.json", tok, NIT, n - 1, caps)
    assert short.stats.n_too_long == sum(text_len(e) > n - 1 for e in exs) > 0
    assert len(short) + short.stats.n_too_long == 7
    # a limit below the expanded length but above the text length keeps the prompt
    keep = D.load_ppo_prompts(root / "ppo.json", tok, NIT, max(len(e.query_ids) for e in exs) - 1, caps)
    assert len(keep) == 7 and NIT > 0


@pytest.mark.parametrize(
    "text,ct,want",
    [
        ("Anything at all.", 1, None),
        ("A", 2, True),
        ("B. red", 3, True),
        ("(C) green", 4, True),
        ("The answer is D.", 5, True),
        ("B", 2, False),
        ("", 3, False),
        ("A red circle.", 3, False),
        ("No.", 6, True),
        ("No, there is not.", 6, True),
        ("Yes.", 6, False),
        ("Yes.", 7, True),
        ("Yes, it is red.", 7, True),
        ("No.", 7, False),
        ("Maybe.", 7, False),
        ("", 7, False),
    ],
)
def test_is_correct(text, ct, want):
    assert D.is_correct(text, ct) is want


# ---- bad input --------------------------------------------------------------------------------


def _write(root, name, obj):
    p = root / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def _bad_cases():
    pref_bad = json.loads(json.dumps(PREF))
    pref_bad[1]["preference"] = 3
    pref_missing = json.loads(json.dumps(PREF))
    del pref_missing[1]["output_2"]
    sft_missing = json.loads(json.dumps(SFT))
    del sft_missing[1]["conversations"]
    sft_img = json.loads(json.dumps(SFT))
    sft_img[1]["image"] = "nope.png"
    ppo_lb = json.loads(json.dumps(PPO))
    ppo_lb[1]["length_bonus"] = "long"
    ppo_ct = json.loads(json.dumps(PPO))
    ppo_ct[1]["caption_type"] = 9
    sft_turn = json.loads(json.dumps(SFT))
    sft_turn[1]["conversations"][1]["from"] = "human"
    return [
        ("sft", sft_missing, "conversations"),
        ("sft", sft_img, "image"),
        ("pref", pref_bad, "preference"),
        ("pref", pref_missing, "output_2"),
        ("ppo", ppo_lb, "length_bonus"),
        ("ppo", ppo_ct, "caption_type"),
        ("sft", sft_turn, "conversations[1].from"),
    ]


def _loader(kind, tok, root, path, skip):
    caps = D.load_captions(root / "caps.json")
    imgs = str(root / "images")
    if kind == "sft":
        return D.load_sft(path, tok, NIT, 1000, skip_bad=skip, image_folder=imgs)
    if kind == "pref":
        return D.load_preferences(path, tok, NIT, 1000, caps, True, skip_bad=skip, image_folder=imgs)
    return D.load_ppo_prompts(path, tok, NIT, 1000, caps, skip_bad=skip, image_folder=imgs)


@pytest.mark.parametrize("kind,records,field", _bad_cases())
def test_bad_record_names_file_index_field_or_is_skipped(tok, root, kind, records, field):
    path = _write(root, f"bad_{kind}.json", records)
    with pytest.raises(D.DataError) as ei:
        _loader(kind, tok, root, path, skip=False)
    e = ei.value
    assert (e.file, e.index, e.field) == (str(path), 1, field)
    assert str(path) in str(e) and "record 1" in str(e) and f"'{field}'" in str(e)
    exs = _loader(kind, tok, root, path, skip=True)
    assert exs.stats.n_skipped == 1 and len(exs) == len(records) - 1 and exs.stats.errors == [str(e)]


def test_malformed_json_and_missing_file(tok, root):
    p = _write(root, "broken.json", '[{"id": "a", "conversations": [}')
    for kind in ("sft", "pref", "ppo"):
        with pytest.raises(D.DataError, match="malformed JSON") as ei:
            _loader(kind, tok, root, p, skip=True)  # file-level errors are never skipped
        assert ei.value.file == str(p)
    with pytest.raises(D.DataError, match="malformed JSON"):
        D.load_captions(p)
    with pytest.raises(D.DataError, match="not found"):
        D.load_sft(root / "nope.json", tok, NIT, 100)
    with pytest.raises(D.DataError, match="expected a JSON list"):
        D.load_sft(_write(root, "obj.json", {"a": 1}), tok, NIT, 100)
    with pytest.raises(D.DataError) as ei:
        D.load_captions(_write(root, "c.json", {"x.png": [1, 2]}))
    assert ei.value.index == "x.png"


def test_missing_captions_for_image_is_an_error(tok, root):
    with pytest.raises(D.DataError) as ei:
        D.load_preferences(root / "pref.json", tok, NIT, 1000, {"img2.png": ["x"]}, True)
    assert (ei.value.index, ei.value.field) == (0, "image")


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 10)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(["human", "gpt", "<image>", "img1.png", "nope.png", "value", "from"]),
    lambda c: (
        st.lists(c, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "image",
                    "conversations",
                    "from",
                    "value",
                    "output_1",
                    "output_2",
                    "preference",
                    "hallucination",
                    "caption_type",
                    "length_bonus",
                    "x",
                ]
            ),
            c,
            max_size=6,
        )
    ),
    max_leaves=20,
)


def _mutations():
    base = st.sampled_from(SFT + PREF + PPO)
    key = st.sampled_from(
        [
            "id",
            "image",
            "conversations",
            "output_1",
            "output_2",
            "preference",
            "hallucination",
            "caption_type",
            "length_bonus",
        ]
    )

    def mutate(args):
        rec, k, v, delete = args
        rec = json.loads(json.dumps(rec))
        if delete:
            rec.pop(k, None)
        else:
            rec[k] = v
        return rec

    return st.tuples(base, key, _json, st.booleans()).map(mutate)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    recs=st.lists(_mutations() | _json, max_size=4),
    kind=st.sampled_from(["sft", "pref", "ppo"]),
    skip=st.booleans(),
)
def test_fuzz_loaders_only_raise_data_error(tok, root, recs, kind, skip):
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=root, delete=False) as f:
        json.dump(recs, f)
    try:
        out = _loader(kind, tok, root, f.name, skip)
        assert skip or out.stats.n_skipped == 0
        assert len(out) + out.stats.n_skipped + out.stats.n_too_long == len(recs)
    except D.DataError as e:
        assert not skip or e.index is None  # with skip, only file-level errors propagate
        assert e.file == f.name
    finally:
        os.unlink(f.name)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    text=st.text(max_size=40) | st.sampled_from(["[", "{}", "[]", "null", "[1]", "NaN", '"x"', '{"a": "b"}'])
)
def test_fuzz_raw_files(tok, root, text):
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=root, delete=False) as f:
        f.write(text)
    try:
        for fn in (
            lambda: D.load_sft(f.name, tok, NIT, 100),
            lambda: D.load_captions(f.name),
            lambda: D.load_ppo_prompts(f.name, tok, NIT, 100, None, skip_bad=True),
        ):
            try:
                fn()
            except D.DataError:
                pass
    finally:
        os.unlink(f.name)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["sft.json", "pref.json", "ppo.json", "caps.json"]), cut=st.floats(0, 1),
       junk=st.sampled_from(["", "\x00", "}", "]", ",", "\ufffd", "\\"]))
def test_fuzz_truncated_files_only_raise_data_error(tok, root, kind, cut, junk):
    """A valid file of each format cut anywhere (a copy interrupted, a disk that filled) plus junk."""
    text = (root / kind).read_text()
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=root, delete=False) as f:
        f.write(text[:int(cut * len(text))] + junk)
    loaders = {"sft.json": lambda: D.load_sft(f.name, tok, NIT, 100, image_folder=str(root / "images")),
               "pref.json": lambda: D.load_preferences(f.name, tok, NIT, 400, D.load_captions(root / "caps.json"),
                                                       True, image_folder=str(root / "images")),
               "ppo.json": lambda: D.load_ppo_prompts(f.name, tok, NIT, 100, D.load_captions(root / "caps.json"),
                                                      image_folder=str(root / "images")),
               "caps.json": lambda: D.load_captions(f.name)}
    try:
        loaders[kind]()
    except D.DataError as e:
        assert e.file == f.name
    finally:
        os.unlink(f.name)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(cut=st.floats(0, 1), flip=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_fuzz_damaged_images_are_data_errors(root, cut, flip, byte):
    """A PNG truncated or with one byte changed: the load-time check and load_image name the file."""
    data = bytearray((root / "images" / "img1.png").read_bytes())
    data = data[:max(1, int(cut * len(data)))]
    data[flip % len(data)] = byte
    bad = root / "images" / f"fuzz{flip}.png"
    bad.write_bytes(bytes(data))
    try:
        problem = D.image_problem(str(bad))
        assert problem is None or str(bad) in problem
        try:
            D.load_image(bad, D.make_image_processor(8))
        except D.DataError as e:
            assert e.file == str(bad)
    finally:
        bad.unlink()


# ---- images and collators ---------------------------------------------------------------------


def test_load_image_pads_to_square_with_mean_color(root):
    proc = D.make_image_processor(16)
    x = D.load_image(root / "images" / "img1.png", proc, aspect="pad")  # 20x10 red -> 20x20
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    mean, std = torch.tensor(proc.image_mean), torch.tensor(proc.image_std)
    pad = (torch.tensor([int(m * 255) for m in proc.image_mean]) / 255 - mean) / std
    red = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    torch.testing.assert_close(x[:, 0, 0], pad, atol=0.02, rtol=0)  # top rows: padding
    torch.testing.assert_close(x[:, 8, 8], red, atol=0.02, rtol=0)  # centre: the image
    crop = D.load_image(root / "images" / "img1.png", proc, aspect="crop")
    torch.testing.assert_close(crop[:, 0, 0], red, atol=0.02, rtol=0)  # cropped: no padding at all
    with pytest.raises(D.DataError, match="not found"):
        D.load_image(root / "images" / "nope.png", proc)


def test_collators(tok, root):
    caps = D.load_captions(root / "caps.json")
    load = D.image_loader(str(root / "images"), D.make_image_processor(16))
    pad = tok.pad_token_id
    sft = D.load_sft(root / "sft.json", tok, NIT, 1000)
    b = D.collate_sft([sft[2], sft[1]], pad, load)  # text-only first
    T = max(len(sft[2].input_ids), len(sft[1].input_ids))
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, T)
    n0 = len(sft[2].input_ids)
    assert b["input_ids"][0, :n0].tolist() == sft[2].input_ids and (b["input_ids"][0, n0:] == pad).all()
    assert (b["labels"][0, n0:] == -100).all() and b["attention_mask"][0].tolist() == [1] * n0 + [0] * (
        T - n0
    )
    assert b["pixel_values"].shape == (1, 3, 16, 16) and b["has_image"].tolist() == [False, True]
    torch.testing.assert_close(b["pixel_values"][0], load("img2.png"))
    assert D.collate_sft([sft[2]], pad, None)["pixel_values"] is None
    with pytest.raises(ValueError):
        D.collate_sft([sft[1]], pad, None)

    prefs = D.load_preferences(root / "pref.json", tok, NIT, 1000, caps, True)
    pb = D.collate_preferences(prefs, pad, load)
    assert pb["hallucination"].tolist() == [-1, 1, 0]
    assert pb["chosen_suffix_len"].tolist() == [e.chosen_suffix_len for e in prefs]
    assert pb["rejected_suffix_len"].tolist() == [e.rejected_suffix_len for e in prefs]
    assert pb["chosen_input_ids"].shape == pb["rejected_input_ids"].shape
    for k, e in enumerate(prefs):
        n = len(e.rejected_ids)
        assert pb["rejected_input_ids"][k, :n].tolist() == e.rejected_ids
        assert pb["rejected_attention_mask"][k].sum() == n
    assert pb["pixel_values"].shape[0] == 2

    ppo = D.load_ppo_prompts(root / "ppo.json", tok, NIT, 1000, caps)
    qb = D.collate_prompts(ppo, pad, load)
    T = qb["input_ids"].shape[1]
    for k, e in enumerate(ppo):  # left padding: every query ends at the last column
        n = len(e.query_ids)
        assert (
            qb["input_ids"][k, T - n :].tolist() == e.query_ids and (qb["input_ids"][k, : T - n] == pad).all()
        )
        assert qb["attention_mask"][k].tolist() == [0] * (T - n) + [1] * n
    assert qb["caption_type"].tolist() == list(range(1, 8)) and qb["length_bonus"].dtype == torch.float32
    assert qb["pixel_values"].shape[0] == sum(e.image is not None for e in ppo)


def test_text_corpus(root):
    texts = list(D.text_corpus(root))
    joined = "\n".join(texts)
    for s in (
        "The circle is red.",
        "The correct option is B: red.",
        "Go away.",
        "Question number 7?",
        SYS,
        "the quality score of my last response is",
    ):
        assert s in joined
    assert "img1.png" not in joined and "<image>" not in joined


# ---- real data as the original reads it --------------------------------------------------------


def test_image_placeholder_moves_to_the_front_as_llava(tok, root):
    front = [{"id": 0, "image": "img1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "Red."}]}]
    end = json.loads(json.dumps(front))
    end[0]["conversations"][0]["value"] = "What color is the circle?\n<image>"
    mid = json.loads(json.dumps(front))
    mid[0]["conversations"][0]["value"] = "What color <image> is the circle?"
    a, b = (D.load_sft(_write(root, f"{n}.json", r), tok, NIT, 1000) for n, r in (("front", front), ("end", end)))
    assert a[0].input_ids == b[0].input_ids and a[0].labels == b[0].labels
    img = tok.convert_tokens_to_ids("<image>")
    c = D.load_sft(_write(root, "mid.json", mid), tok, NIT, 1000)[0]
    assert c.input_ids.index(img) == a[0].input_ids.index(img)  # in front, whatever the text around it
    q = [D.render_query(tok, t, NIT, True) for t in ("<image>\nWhat color?", "What color?\n<image>", "What color?")]
    assert q[0] == q[1] == q[2]


def test_ppo_prompt_defaults_as_the_original(tok, root):
    recs = [{"id": 0, "image": "img1.png", "conversations": [{"from": "human", "value": "Describe it."}]}]
    ex = D.load_ppo_prompts(_write(root, "ppo_min.json", recs), tok, NIT, 1000, None)[0]
    assert (ex.caption_type, ex.length_bonus, ex.captions) == (1, 1.0, [])  # and no captions needed


def test_captions_only_for_a_fact_augmented_rm(tok, root):
    recs = json.loads(json.dumps(PREF))
    recs[0]["image"] = "img9.png"  # no entry in the captions file
    path = _write(root, "pref_nocap.json", recs)
    van = D.load_preferences(path, tok, NIT, 1000, None, fact_augmented=False)  # no captions file at all
    assert len(van) == len(recs)
    caps = D.load_captions(root / "caps.json")
    with pytest.raises(D.DataError, match="img9.png") as ei:
        D.load_preferences(path, tok, NIT, 1000, caps, fact_augmented=True)
    assert ei.value.index == 0 and str(root / "caps.json") in str(ei.value)
    skipped = D.load_preferences(path, tok, NIT, 1000, caps, fact_augmented=True, skip_bad=True)
    assert skipped.stats.n_skipped == 1 and len(skipped) == len(recs) - 1
    ppo = _write(root, "ppo_nocap.json", [dict(PPO[0], image="img9.png")])
    with pytest.raises(D.DataError, match=f"img9.png.*{root / 'caps.json'}"):
        D.load_ppo_prompts(ppo, tok, NIT, 1000, caps)
    assert len(D.load_ppo_prompts(ppo, tok, NIT, 1000, None)) == 1  # vanilla RM: no captions needed


@pytest.mark.parametrize("flag, want", [(True, True), (0, False), (1, True), ("true", True), ("No", False),
                                        (" YES ", True), ("false", False)])
def test_hallucination_flag_forms(tok, root, flag, want):
    recs = json.loads(json.dumps(PREF[:1]))
    recs[0]["hallucination"] = flag
    assert D.load_preferences(_write(root, "pref_h.json", recs), tok, NIT, 1000, None, False)[0].hallucination is want


@pytest.mark.parametrize("flag", ["maybe", 2, 0.5, [1]])
def test_hallucination_flag_bad_value_names_the_record(tok, root, flag):
    recs = json.loads(json.dumps(PREF[:1]))
    recs[0]["hallucination"] = flag
    with pytest.raises(D.DataError, match="record 0: field 'hallucination'"):
        D.load_preferences(_write(root, "pref_hb.json", recs), tok, NIT, 1000, None, False)


def test_preference_file_alone_gives_a_seeded_held_out_split(tok, root):
    from types import SimpleNamespace

    from factrl.trainers.config import load_config
    from factrl.trainers.rm import load_pairs

    recs = [dict(json.loads(json.dumps(PREF[0])), id=f"p{i}") for i in range(30)]
    for i, r in enumerate(recs):
        r["output_1"] = {"value": f"The circle is blue {i}."}
    _write(root, "preference.json", recs)  # and no preference_eval.json
    a = SimpleNamespace(data_root=root, tokenizer=tok, num_image_tokens=NIT)

    def split(seed, size=7):
        cfg = load_config("tiny", [f"run.seed={seed}", f"rm.eval_size={size}", "data.max_seq_len=1000"])
        train, held = load_pairs(cfg, a, fact_augmented=False)
        return [e.id for e in train], [e.id for e in held]

    t0, h0 = split(0)
    assert len(h0) == 7 and len(t0) == 23 and not set(t0) & set(h0) and set(t0) | set(h0) == {r["id"] for r in recs}
    assert split(0) == (t0, h0) and split(1)[1] != h0
    with pytest.raises(ValueError, match="rm.eval_size=30"):
        split(0, 30)


def test_prefetch_memoizes_the_ids_of_one_call_per_piece(tok):
    """The batched encode behind the preference loader gives each piece the ids one
    ``tokenizer.encode`` call gives it (pieces around ``<image>``, stripped, as encode_segment)."""
    texts = ["  A red circle.\nA blue square. ", "<image>\nWhat is here?", "Is it big?<image> No.", ""]
    D.prefetch(tok, texts)
    memo = D._memo(tok)
    for piece in ("A red circle.\nA blue square.", "What is here?", "Is it big?", "No."):
        assert memo[piece] == tuple(enc(tok, piece))
    assert D.encode_segment(tok, texts[2], 2) == enc(tok, "Is it big?") + [tok.convert_tokens_to_ids("<image>")] * 2 \
        + enc(tok, "No.")


def test_system_prompt_is_configurable_and_can_be_empty(tok, root):
    """data.system_prompt: the first human turn opens with it; "" = the turn starts at "USER:"."""
    e = D.load_sft(root / "sft.json", tok, NIT, 1000, system="")[2]  # the text-only record
    assert e.input_ids == [tok.bos_token_id] + enc(tok, "USER: Hello there ASSISTANT:") + enc(tok, "Hi.") + [
        tok.eos_token_id]
    assert D.render_query(tok, "Hi?", NIT, False, system="") == [tok.bos_token_id] + enc(tok, "USER: Hi? ASSISTANT:")
    assert D.render_query(tok, "Hi?", NIT, False) == [tok.bos_token_id] + enc(tok, f"{SYS} USER: Hi? ASSISTANT:")
    assert load_config("tiny").data.system_prompt == "" and load_config("llava-v1.5-7b").data.system_prompt == SYS
    assert SYS.startswith("A chat between a curious human and an artificial intelligence assistant.")


def test_select_question_types(tmp_path):
    """rm.question_types / ppo.question_types: examples kept by their record's question_type;
    all when none are named; a record without the field, or a selection keeping nothing, refused."""
    from types import SimpleNamespace

    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"id": "a", "question_type": "holistic"}, {"id": "b", "question_type": "counting"},
                                {"id": "c", "question_type": "holistic"}]))
    ex = [SimpleNamespace(id=i) for i in "abc"]
    assert D.select_question_types(ex, path, [], "rm.question_types") is ex
    assert [e.id for e in D.select_question_types(ex, path, ["holistic"], "rm.question_types")] == ["a", "c"]
    with pytest.raises(D.DataError, match=r"keeps none.*counting, holistic"):
        D.select_question_types(ex, path, ["spatial"], "ppo.question_types")
    path.write_text(json.dumps([{"id": "a", "question_type": "holistic"}, {"id": "b"}]))
    with pytest.raises(D.DataError, match=r"record b: field 'question_type': missing: rm.question_types"):
        D.select_question_types(ex[:2], path, ["holistic"], "rm.question_types")
