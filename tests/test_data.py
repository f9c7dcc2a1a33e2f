"""The data layer: builtin tokenizer, prompt templates, JSONL records, encoding and the builtin
chain task. Expected values are written out by hand, not recomputed by the code under test."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from graphmoe_fused.data import (
    BUILTIN_TASKS,
    CHOICE_LABELS,
    DataError,
    Example,
    builtin_task,
    builtin_tokenizer,
    collate,
    encode_example,
    encode_prompt,
    label_token_ids,
    load_data_files,
    pad_token_id,
    read_jsonl,
    render_instruction,
    render_multiple_choice,
)
from graphmoe_fused.data.tokenizer import bytes_to_unicode
from graphmoe_fused.data.vocab import BUILTIN_VOCAB_SIZE

from .single_thread import one_cpu_thread  # noqa: F401

MC_PROMPT = ("Please choose the correct answer to the question: Where does Ann live?\n"
             "A. Paris\nB. Rome\nAnswer:")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return builtin_tokenizer()


def _byte_tokenizer(*, append_eos: bool = False) -> PreTrainedTokenizerFast:
    """Bytes only, no merges: " A" is two tokens (a space byte and "A")."""
    table = bytes_to_unicode()
    vocab = {"<s>": 0, "</s>": 1} | {table[b]: b + 2 for b in range(256)}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    if append_eos:
        t.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                         special_tokens=[("</s>", 1)])
    t.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", pad_token="</s>")


# --- builtin tokenizer -------------------------------------------------------------------------

def test_builtin_tokenizer_splits_a_prompt_into_whole_words(tok):
    tokens = tok.convert_ids_to_tokens(tok(MC_PROMPT + " B")["input_ids"])
    assert tokens == [
        "<s>", "Please", "Ġchoose", "Ġthe", "Ġcorrect", "Ġanswer", "Ġto", "Ġthe", "Ġquestion",
        ":", "ĠWhere", "Ġdoes", "ĠAnn", "Ġlive", "?", "Ċ", "A", ".", "ĠParis", "Ċ", "B", ".",
        "ĠRome", "Ċ", "Answer", ":", "ĠB",
    ]


def test_builtin_tokenizer_special_tokens_and_size(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<pad>", "<s>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == BUILTIN_VOCAB_SIZE
    assert 300 < len(tok) < 600
    assert tok("Ann")["input_ids"][0] == 1  # a BOS, and no EOS at the end
    assert tok.eos_token_id not in tok("Ann")["input_ids"]


@pytest.mark.parametrize("text", [
    "", "plain words", "  leading and trailing spaces  ", "tabs\tand\r\nnewlines\n\n",
    "Ünïcödé — 漢字 🙂 emoji", "Annie Parisian Answer:B", "<x>-looking <tags>", "\x00\x7f",
])
def test_builtin_tokenizer_round_trips_any_text(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_unknown_words_fall_back_to_bytes(tok):
    # "Zq" is no word of the vocabulary: one byte token per byte.
    assert tok.convert_ids_to_tokens(tok("Zq", add_special_tokens=False)["input_ids"]) == [
        "Z", "q"]
    assert len(tok("é", add_special_tokens=False)["input_ids"]) == 2  # two UTF-8 bytes


def test_builtin_tokenizer_is_deterministic_and_round_trips_save_pretrained(tok, tmp_path):
    again = builtin_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tok.get_vocab()
    for text in (MC_PROMPT, "any 🙂 text"):
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_labels_are_single_distinct_tokens(tok):
    ids = label_token_ids(tok, list(CHOICE_LABELS))
    assert ids == [tok.convert_tokens_to_ids("Ġ" + c) for c in CHOICE_LABELS]
    assert len(set(ids)) == 26


# --- prompts -----------------------------------------------------------------------------------

def test_render_multiple_choice():
    prompt, labels = render_multiple_choice("Where does Ann live?", ["Paris", "Rome"])
    assert prompt == MC_PROMPT
    assert labels == ("A", "B")
    assert CHOICE_LABELS == "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@pytest.mark.parametrize("n", [0, 1, 27])
def test_render_multiple_choice_rejects_choice_counts(n):
    with pytest.raises(ValueError, match=f"2 to 26 choices, got {n}"):
        render_multiple_choice("q", ["x"] * n)


def test_render_instruction_alpaca_templates():
    assert render_instruction("Add.", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n")
    assert render_instruction("Add.") == render_instruction("Add.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd.\n\n### Response:\n")


# --- records -----------------------------------------------------------------------------------

def _write(path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
                    encoding="utf-8")
    return str(path)


def test_read_jsonl_mixed_formats(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        {"instruction": "Say hi.", "output": "hi", "id": 7},
        "",
        {"question": "Where does Ann live?", "choices": ["Paris", "Rome"], "answer": "B"},
        {"instruction": "Add.", "input": "1 2", "output": "3"},
    ])
    examples = read_jsonl(path)
    assert examples == [
        Example(prompt=render_instruction("Say hi."), completion="hi", source=f"{path}:1"),
        Example(prompt=MC_PROMPT, completion=" B", choices=("A", "B"), answer="B",
                source=f"{path}:3"),
        Example(prompt=render_instruction("Add.", "1 2"), completion="3", source=f"{path}:4"),
    ]


@pytest.mark.parametrize("answer,label", [("B", "B"), (1, "B"), ("Rome", "B"), ("A", "A"),
                                          (0, "A"), ("Paris", "A"), ("C", "C"), (2, "C")])
def test_answer_forms(tmp_path, answer, label):
    record = {"question": "q?", "choices": ["Paris", "Rome", "Oslo"], "answer": answer}
    (example,) = read_jsonl(_write(tmp_path / "a.jsonl", [record]))
    assert (example.answer, example.completion, example.choices) == (label, " " + label,
                                                                     ("A", "B", "C"))


MC = {"question": "q?", "choices": ["x", "y"], "answer": "A"}
INSTR = {"instruction": "do", "output": "done"}
MALFORMED = [
    ('{"question": "q?", "choices": ["x", "y"], "answer": "A"', "invalid JSON"),
    ('{"instruction": "do", "output": "x", "output": "y"}', "key 'output' is given twice"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"text"', "expected a JSON object, got str"),
    ({"prompt": "p", "completion": "c"}, "neither an instruction record"),
    ({**INSTR, **MC}, "both 'instruction' and 'question'"),
    ({"instruction": "do"}, "missing field 'output'"),
    ({"instruction": "do", "output": 3}, "field 'output' must be a string, got int"),
    ({"instruction": "  ", "output": "x"}, "field 'instruction' is empty"),
    ({"instruction": "do", "input": None, "output": "x"}, "field 'input' must be a string"),
    ({"question": "q?", "answer": "A"}, "missing field 'choices'"),
    ({"question": "q?", "choices": ["x", "y"]}, "missing field 'answer'"),
    ({"question": 5, "choices": ["x", "y"], "answer": "A"}, "field 'question' must be a string"),
    ({"question": "q?", "choices": "x y", "answer": "A"}, "'choices' must be a list of strings"),
    ({"question": "q?", "choices": ["x"], "answer": "A"}, "2 to 26 choices, got 1"),
    ({"question": "q?", "choices": ["x", 2], "answer": "A"}, "choice 1 must be a string"),
    ({"question": "q?", "choices": ["x", ""], "answer": "A"}, "choice 1 is empty"),
    ({**MC, "answer": "C"}, "answer 'C' is not among the choices"),
    ({**MC, "answer": "z"}, "answer 'z' is not among the choices"),
    ({**MC, "answer": 2}, "answer index 2 is out of range for 2 choices"),
    ({**MC, "answer": -1}, "answer index -1 is out of range"),
    ({**MC, "answer": True}, "field 'answer' must be a label letter"),
    ({**MC, "answer": [0]}, "field 'answer' must be a label letter"),
    ({"question": "q?", "choices": ["B", "A"], "answer": "A"}, "ambiguous"),
    ({"question": "q?", "choices": ["x", "y", "x"], "answer": "x"},
     "ambiguous: it is the text of choices A, C"),
]


@pytest.mark.parametrize("line,message", MALFORMED)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [INSTR, "   ", line, MC])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        read_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: no examples")):
        read_jsonl(path)


def test_missing_file_directory_and_binary(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        read_jsonl(tmp_path)
    (tmp_path / "bin.jsonl").write_bytes(b'{"instruction": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_jsonl(tmp_path / "bin.jsonl")
    # A byte-order mark (what some Windows editors write first) is not part of the JSON.
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(INSTR).encode() + b"\n")
    assert [e.prompt for e in read_jsonl(bom)] == [e.prompt for e in read_jsonl(
        _write(tmp_path / "plain.jsonl", [INSTR]))]


def test_load_data_files_keeps_order_and_checks_every_file(tmp_path):
    b = _write(tmp_path / "b.jsonl", [MC])
    a = _write(tmp_path / "a.jsonl", [INSTR, INSTR])
    loaded = load_data_files([b, a])
    assert list(loaded) == [b, a]
    assert [len(v) for v in loaded.values()] == [1, 2]
    bad = _write(tmp_path / "c.jsonl", [INSTR, {"instruction": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: missing field 'output'")):
        load_data_files([a, bad])
    with pytest.raises(DataError, match="given twice"):
        load_data_files([a, b, a])
    other_spelling = f"{tmp_path}/./a.jsonl"
    with pytest.raises(DataError, match=re.escape(f"given twice (as {a})")):
        load_data_files([a, other_spelling])
    with pytest.raises(TypeError, match="list of paths"):
        load_data_files(a)
    assert load_data_files([]) == {}


# --- encoding ----------------------------------------------------------------------------------

def test_encode_multiple_choice_example(tok):
    example = Example(prompt=MC_PROMPT, completion=" B", choices=("A", "B"), answer="B",
                      source="f.jsonl:4")
    feature = encode_example(tok, example, cutoff=512)
    prompt_len = 26  # <s> + the 25 prompt tokens of test_builtin_tokenizer_splits_a_prompt...
    b_id = tok.convert_tokens_to_ids("ĠB")
    assert feature["input_ids"][0] == 1
    assert feature["input_ids"][prompt_len:] == [b_id, 2]
    assert feature["labels"] == [-100] * prompt_len + [b_id, 2]
    assert feature["attention_mask"] == [1] * (prompt_len + 2)


def test_encode_truncates_from_the_end(tok):
    example = Example(prompt=MC_PROMPT, completion=" B", source="f.jsonl:4")
    b_id = tok.convert_tokens_to_ids("ĠB")
    cut = encode_example(tok, example, cutoff=27)
    assert cut["input_ids"][-1] == b_id and len(cut["input_ids"]) == 27
    assert cut["labels"] == [-100] * 26 + [b_id]
    with pytest.raises(DataError, match=r"f\.jsonl:4: nothing left to learn.*cutoff of 26"):
        encode_example(tok, example, cutoff=26)
    with pytest.raises(ValueError, match="cutoff must be a positive"):
        encode_example(tok, example, cutoff=0)


def test_encode_with_a_tokenizer_that_appends_eos():
    t = _byte_tokenizer(append_eos=True)
    feature = encode_example(t, Example(prompt="ab", completion="c"), cutoff=10)
    # bytes shift by 2 (two special tokens first): a=99, b=100, c=101; one EOS (id 1) at the end
    assert feature["input_ids"] == [99, 100, 101, 1]
    assert feature["labels"] == [-100, -100, 101, 1]


def test_encode_prompt_keeps_bos_and_the_end(tok):
    ids = tok(MC_PROMPT)["input_ids"]
    assert encode_prompt(tok, MC_PROMPT, 512) == ids
    short = encode_prompt(tok, MC_PROMPT, 5)
    assert short == [1, *ids[-4:]]
    assert tok.convert_ids_to_tokens(short[-2:]) == ["Answer", ":"]
    with pytest.raises(ValueError, match="cutoff"):
        encode_prompt(tok, MC_PROMPT, 1)


def test_label_token_ids_refuses_multi_token_labels():
    with pytest.raises(ValueError, match=r"label ' A' is not one token for this tokenizer "
                                         r"\(it is 2 tokens"):
        label_token_ids(_byte_tokenizer(), ["A", "B"])


def test_collate_right_pads():
    batch = collate([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                     {"input_ids": [8], "attention_mask": [1], "labels": [8]}], pad_token_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="at least one"):
        collate([], 0)


# --- builtin chain task ------------------------------------------------------------------------

_PERSON = re.compile(r"question: (?:Where does|Which country does) (\w+) live")
_CITY = re.compile(r"question: Which country is (\w+) in\?")


def _chosen(example: Example) -> str:
    """The text of the right choice, read back from the rendered prompt."""
    lines = dict(line.split(". ", 1) for line in example.prompt.splitlines()[1:-1])
    return lines[example.answer]


def test_chain_task_is_deterministic_and_seeded():
    assert BUILTIN_TASKS == ("chain",)
    a, b, c = builtin_task("chain", 0), builtin_task("chain", 0), builtin_task("chain", 1)
    assert a.train == b.train and a.eval == b.eval and a.description == b.description
    assert a.train != c.train
    with pytest.raises(ValueError, match="unknown builtin task 'nope'; choose from chain"):
        builtin_task("nope")


@pytest.mark.parametrize("seed", [0, 3])
def test_chain_task_answers_chain_two_facts(seed):
    task = builtin_task("chain", seed)
    lives_in, located_in = {}, {}
    for ex in task.train:
        if "Where does" in ex.prompt:
            lives_in[_PERSON.search(ex.prompt).group(1)] = _chosen(ex)
        elif (m := _CITY.search(ex.prompt)) is not None:
            located_in[m.group(1)] = _chosen(ex)
    assert len(lives_in) == 32 and len(located_in) == 4
    assert task.facts["lives_in"] == lives_in and task.facts["located_in"] == located_in
    assert set(task.eval) == {"chain-2hop", "chain-1hop"}
    trained_two_hop = {_PERSON.search(ex.prompt).group(1) for ex in task.train
                       if "Which country does" in ex.prompt}
    held_out = [_PERSON.search(ex.prompt).group(1) for ex in task.eval["chain-2hop"]]
    assert len(held_out) == 8 and not set(held_out) & trained_two_hop
    assert len(trained_two_hop) == 24
    for person, ex in zip(held_out, task.eval["chain-2hop"], strict=True):
        assert _chosen(ex) == located_in[lives_in[person]]
    train_prompts = {ex.prompt: ex.answer for ex in task.train}
    # chain-1hop: the trained facts each held-out 2-hop answer goes through
    for ex in task.eval["chain-1hop"]:
        assert train_prompts[ex.prompt] == ex.answer
    assert {_PERSON.search(ex.prompt).group(1) for ex in task.eval["chain-1hop"]
            if "Where does" in ex.prompt} == set(held_out)


def test_chain_task_examples_are_short_four_way_and_whole_words(tok):
    task = builtin_task("chain", 0)
    examples = task.train + [ex for split in task.eval.values() for ex in split]
    for ex in examples:
        assert ex.choices == ("A", "B", "C", "D") and ex.completion == " " + ex.answer
        assert ex.source == "builtin:chain" and ex.prompt.endswith("\nAnswer:")
        ids = tok(ex.prompt + ex.completion)["input_ids"]
        assert len(ids) <= 40
        # ids 4..259 are the byte fallback: every builtin word must be a token of its own
        assert not [i for i in ids if 4 <= i < 260], ex.prompt
    # every answer letter is used in training, so no label is learnt as "never the answer"
    assert {ex.answer for ex in task.train} == {"A", "B", "C", "D"}


def test_read_jsonl_splits_on_newlines_only(tmp_path):
    """U+2028, U+2029 and U+0085 stay raw in JSON written with ensure_ascii=False: they are
    part of a string, not line ends (str.splitlines would break the record there)."""
    path = tmp_path / "u.jsonl"
    odd = "x\u2028y\u2029z\x85w"
    rows = [{"instruction": odd, "output": "o"}, {"question": odd, "choices": ["p", "q"],
                                                   "answer": 1}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)
                    + "\n{bad\n", encoding="utf-8", newline="")
    with pytest.raises(DataError, match=re.escape(f"{path}:4: invalid JSON")):
        read_jsonl(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    first, second = read_jsonl(path)
    assert odd in first.prompt and first.source == f"{path}:1"
    assert odd in second.prompt and second.source == f"{path}:2" and second.answer == "B"


def test_pad_token_id_is_pad_else_eos_else_zero(tok):
    class FakeTokenizer:
        def __init__(self, pad, eos):
            self.pad_token_id, self.eos_token_id = pad, eos

    assert pad_token_id(FakeTokenizer(3, 5)) == 3
    assert pad_token_id(FakeTokenizer(None, 5)) == 5
    assert pad_token_id(FakeTokenizer(0, 5)) == 0
    assert pad_token_id(FakeTokenizer(None, None)) == 0
    assert pad_token_id(object()) == 0
    assert pad_token_id(tok) == tok.pad_token_id
