"""The builtin tokenizer: built in code (no download), byte-level, so any UTF-8 text round-trips.

A Unigram model over a GPT-2 style byte-level pre-tokenizer: its pieces are the 256 byte
symbols (the fallback, so no text is ever unknown), the special tokens and the whole words of
:mod:`.vocab` (the prompt templates and the builtin task). Viterbi segmentation prefers a whole
word (score -1) to its bytes (score -10 each), so every builtin prompt word, and each label
" A".." Z" after "Answer:", is one token. The ids follow the fixed order of :mod:`.vocab`: the
same ids at every build.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .vocab import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, whole_words

WORD_SCORE = -1.0
BYTE_SCORE = -10.0
MODEL_MAX_LENGTH = 1024


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level pre-tokenizer's)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _piece(text: str) -> str:
    """``text`` as the byte-level pre-tokenizer spells it (" Paris" -> "ĠParis")."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def _build_tokenizers_object() -> Tokenizer:
    vocab = [(token, 0.0) for token in SPECIAL_TOKENS]
    vocab += [(bytes_to_unicode()[b], BYTE_SCORE) for b in range(256)]
    vocab += [(_piece(word), WORD_SCORE) for word in whole_words()]
    tok = Tokenizer(models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index(UNK), byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    bos_id = SPECIAL_TOKENS.index(BOS)
    # Like LLaMA: a BOS before every sequence, no EOS (training appends EOS to completions).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def builtin_tokenizer() -> PreTrainedTokenizerFast:
    """A new builtin tokenizer (a ``PreTrainedTokenizerFast``; bos ``<s>``, eos ``</s>``, pad
    ``<pad>``, unk ``<unk>``; it adds a BOS, not an EOS). Deterministic: the same ids every
    build; ``save_pretrained`` + ``AutoTokenizer.from_pretrained`` give it back."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizers_object(), bos_token=BOS, eos_token=EOS,
        pad_token=PAD, unk_token=UNK, model_max_length=MODEL_MAX_LENGTH, padding_side="right",
    )
