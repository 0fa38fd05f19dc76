"""A small Llama-style tokenizer for the embedded tiny model, built with `tokenizers`.

BPE over Metaspace ("▁" marks a preceding space, one prepended to every encode call, as
Llama's sentencepiece does), so encoding text segments separately and concatenating the ids
gives the same ids as LLaVA's per-round tokenization of a real checkpoint. Special tokens
follow llava-hf: <unk> 0, <s> 1, </s> 2, then <image> and <pad>.
"""

from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a BPE tokenizer on ``texts``; returns a transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
         pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # Every printable ASCII character is in the alphabet, so no input maps to <unk>.
    alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", additional_special_tokens=["<image>"], padding_side="right",
        clean_up_tokenization_spaces=False,
    )
