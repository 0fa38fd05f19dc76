"""The reward model's prompt: the text after the response, ending where the score is read.

As the original renders it (RLHF/data_utils/common_utils.py:377-395 in RM training,
RLHF/models/ppo_trainer.py:315-373 in PPO): RM input = conversation + response + ``</s>`` +
" " + template. A fact template's ``{factual_prompt}`` becomes FACTUAL_PROMPT
(RLHF/data_utils/constants.py:19) followed by one "  - caption" line per caption, shuffled at
every use. Which captions: RM training reads the image's entry (data_utils_rm.py:85-90); PPO reads
the ``aok_`` entry for caption_type 2-5 and the image's entry for 1, 6, 7 (ppo_trainer.py:336-350).

Templates: ``original`` (the recipe's files, trainers/templates/fact_rlhf_reward_prompt.txt and
reward_prompt.txt, copied verbatim) or ``factrl`` (fact_rm.txt / vanilla_rm.txt: one sentence,
``{captions}`` one per line — the tiny preset's, as the original is ~400 tiny-tokenizer tokens).
"""

from __future__ import annotations

import os
import random
from functools import lru_cache
from pathlib import Path
from typing import Optional

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATES = {"original": ("fact_rlhf_reward_prompt.txt", "reward_prompt.txt"),
             "factrl": ("fact_rm.txt", "vanilla_rm.txt")}
FACTUAL_PROMPT = ("Specifically, the AI's response should be fully supported by the combination of the "
                  "following captions:\n")
PLACEHOLDERS = ("{factual_prompt}", "{captions}")


@lru_cache(maxsize=16)
def _read(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def load_template(template: Optional[str] = "", fact_augmented: bool = True) -> str:
    """The template text. ``template``: "" / "original" / "factrl" -> a packaged pair (fact or
    vanilla); a path to an existing file -> its text; else the template text itself. A fact
    template needs ``{factual_prompt}`` (bulleted, as the original) or ``{captions}`` (one per line)."""
    name = template or "original"
    if name in TEMPLATES:
        text = _read(str(TEMPLATE_DIR / TEMPLATES[name][0 if fact_augmented else 1]))
    elif "\n" not in name and len(name) < 4096 and os.path.isfile(name):
        text = _read(name)
    else:
        text = name
    text = text.strip()
    if fact_augmented and not any(p in text for p in PLACEHOLDERS):
        raise ValueError(f"fact-augmented RM template needs a {PLACEHOLDERS[0]} or {PLACEHOLDERS[1]} "
                         f"placeholder: {text[:80]!r}")
    return text


def fact_key(image: str, caption_type: Optional[int] = None) -> str:
    """The captions-file entry the RM reads: ``aok_<image>`` for caption_type 2-5 (the multiple-
    choice truth), else the image's own captions (RM training passes no caption_type)."""
    return f"aok_{image}" if caption_type in (2, 3, 4, 5) else image


def render(template: str, captions: list[str], rng: Optional[random.Random] = None) -> str:
    """The prompt with its facts filled in, captions shuffled by ``rng`` (a copy; none = as given)."""
    caps = list(captions)
    if rng is not None:
        rng.shuffle(caps)
    if PLACEHOLDERS[0] in template:
        return template.replace(PLACEHOLDERS[0], FACTUAL_PROMPT + "".join(f"  - {c}\n" for c in caps))
    return template.replace(PLACEHOLDERS[1], "\n".join(c.strip() for c in caps))
