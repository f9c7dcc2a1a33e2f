"""The words the builtin tokenizer keeps whole: the prompt templates' words and the builtin
task's entities. One list shared by :mod:`.tokenizer` and :mod:`.builtin`, so that every word of
a builtin prompt is one token and the vocabulary size is known without building the tokenizer.
"""

from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS

LETTERS = tuple(chr(ord("A") + i) for i in range(26))

# The builtin "chain" world: people live in cities, cities lie in countries.
PEOPLE = (
    "Ann", "Ben", "Cal", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Leo",
    "Max", "Ned", "Oda", "Pam", "Quinn", "Ray", "Sam", "Tom", "Uma", "Val", "Wes", "Zoe",
    "Amy", "Bob", "Cy", "Dee", "Eli", "Flo", "Gil", "Hugo",
)
CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Quito")
COUNTRIES = ("Peru", "Chad", "Fiji", "Iran", "Mali", "Laos", "Oman", "Togo")

# Words of the prompt templates (prompts.py) and of the chain task's questions (builtin.py).
TEMPLATE_WORDS = (
    # multiple choice
    "Please", "choose", "the", "correct", "answer", "to", "question", "Answer",
    # Alpaca instruction template
    "Below", "is", "an", "instruction", "that", "describes", "a", "task", "paired", "with",
    "input", "provides", "further", "context", "Write", "response", "appropriately",
    "completes", "request", "Instruction", "Input", "Response",
    # chain task questions
    "Where", "does", "live", "Which", "country", "in", "lives",
)
PUNCTUATION = (":", ".", "?", ",", "\n", "\n\n", "###", "'", '"', "!", "-", "(", ")")


def whole_words() -> tuple[str, ...]:
    """Every word kept whole, each once, in a fixed order (the tokenizer's ids follow it).

    Each word comes twice: bare (line start, after punctuation) and after a space (" Paris"),
    as a byte-level pre-tokenizer presents words inside a sentence. The labels " A".." Z" and
    "A".."Z" are among them, so a label after "Answer:" is one token.
    """
    words = (*TEMPLATE_WORDS, *PEOPLE, *CITIES, *COUNTRIES, *LETTERS)
    seen: dict[str, None] = {}
    for word in words:
        seen.setdefault(word, None)
        seen.setdefault(" " + word, None)
    for mark in PUNCTUATION:
        seen.setdefault(mark, None)
    return tuple(seen)


# 256 byte tokens (the fallback) + special tokens + whole words.
BUILTIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + len(whole_words())
