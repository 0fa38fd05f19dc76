"""Generic hallucination metrics: POPE / multiple-choice parsing, POPE, MMHal-style and RM accuracy."""

import pytest

from factrl.trainers import metrics as M


@pytest.mark.parametrize(
    "text,want",
    [
        ("Yes.", "yes"),
        ("No.", "no"),
        ("no", "no"),
        ("Yes, there is a red circle.", "yes"),
        ("There is not a star.", "no"),
        ("No, it is not.", "no"),
        ("Yes. But no star.", "yes"),
        ("I think so", "yes"),
        ("", "yes"),
        ("NO!", "no"),
        ("Nothing here", "yes"),
    ],
)
def test_parse_yes_no_pope_rule(text, want):
    assert M.parse_yes_no(text) == want


@pytest.mark.parametrize(
    "text,want",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C) red", "C"),
        ("D red", None),
        ("D. red", "D"),
        ("A", "A"),
        ("The answer is A.", "A"),
        ("A red circle.", None),
        ("", None),
        ("b", None),
        ("Blue.", None),
    ],
)
def test_parse_choice(text, want):
    assert M.parse_choice(text) == want


def test_pope_metrics_hand_worked():
    m = M.pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(0.6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.6)
    none = M.pope_metrics(["no", "no"], ["yes", "no"])
    assert none["precision"] == 0.0 and none["f1"] == 0.0 and none["accuracy"] == 0.5
    with pytest.raises(ValueError):
        M.pope_metrics(["maybe"], ["yes"])


def test_mmhal_and_rm_accuracy_hand_worked():
    recs = [
        {"category": "attribute", "correct": True, "hallucination": False},
        {"category": "attribute", "correct": False, "hallucination": True},
        {"category": "counting", "correct": False, "hallucination": False},
    ]
    m = M.mmhal_score(recs)
    assert m["score"] == pytest.approx(1.5 / 3) and m["hallucination_rate"] == pytest.approx(1 / 3)
    assert m["per_category"]["attribute"] == {"score": 0.5, "hallucination_rate": 0.5, "n": 2}
    assert m["per_category"]["counting"] == {"score": 0.5, "hallucination_rate": 0.0, "n": 1}
    r = M.rm_accuracy([(1.0, 0.0, True), (0.0, 1.0, True), (2.0, -1.0, False), (0.5, 0.5, None), (3, 1, -1)])
    assert r["accuracy"] == pytest.approx(3 / 5) and r["n"] == 5
    assert r["accuracy_hallucination"] == 0.5 and r["n_hallucination"] == 2
    assert r["accuracy_non_hallucination"] == 1.0 and r["n_non_hallucination"] == 1
    assert M.rm_accuracy([])["accuracy"] is None


def test_chair_metrics_on_plain_labels():
    res = M.chair_metrics([["cat", "dog"], [], ["cow"]], [{"cat"}, {"dog"}, {"cow", "pig"}])
    assert res == {"chair_i": pytest.approx(1 / 3), "chair_s": pytest.approx(1 / 3), "coverage": 0.5, "n": 3,
                   "n_mentions": 3}
    with pytest.raises(ValueError):
        M.chair_metrics([["cat"]], [])
