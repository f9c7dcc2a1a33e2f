"""Evaluation (graphmoe_fused.evaluation and ``graphmoe-fused eval``): multiple-choice accuracy
from the label logits at the last prompt token, perplexity, generation, and the command that
puts the base model and its GraphMoE conversion side by side. Expectations are computed by hand
here, from one unbatched forward per example."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

import graphmoe_fused as gm
from graphmoe_fused.cli import eval_command
from graphmoe_fused.cli.args import OneLineParser
from graphmoe_fused.data import (
    DataError,
    Example,
    builtin_task,
    encode_prompt,
    label_token_ids,
    load_data_files,
    render_multiple_choice,
)
from graphmoe_fused.evaluation import (
    generate,
    generate_ids,
    multiple_choice_accuracy,
    perplexity,
    read_documents,
)
from graphmoe_fused.hf.local_model import load_base_model

from .single_thread import one_cpu_thread  # noqa: F401 (autouse fixture)
from .tiny_models import converted, graphmoe_config, randomize_adapters_

QUESTIONS = [
    ("Where does Ann live?", ["Paris", "Rome", "Oslo"]),
    ("Which country is Rome in?", ["Italy", "Peru", "Chad", "Fiji"]),
    ("Which country does Ben live in, if he lives where his sister Amy lives?", ["Mali", "Laos"]),
    ("Where?", ["Oslo", "Lima", "Kiev", "Baku"]),
    ("Which country is Oslo in?", ["Norway", "Chad", "Peru"]),
]


def _examples(answers: list[str] | None = None, source: str = "t.jsonl") -> list[Example]:
    examples = []
    for i, (question, choices) in enumerate(QUESTIONS):
        prompt, labels = render_multiple_choice(question, choices)
        answer = answers[i] if answers else labels[0]
        examples.append(Example(prompt, " " + answer, labels, answer, f"{source}:{i + 1}"))
    return examples


def _converted_builtin(seed: int = 0):
    model, tokenizer = load_base_model(None)
    gm.apply_graphmoe(model, graphmoe_config(num_rounds=2))
    randomize_adapters_(model, seed)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def base():
    return load_base_model(None)


@pytest.fixture(scope="module")
def graphmoe_model():
    return _converted_builtin()


def _hand_label_logits(model, tokenizer, example: Example) -> torch.Tensor:
    """One unbatched forward: the label tokens' logits after the whole prompt."""
    ids = torch.tensor([tokenizer(example.prompt)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return logits[label_token_ids(tokenizer, example.choices)]


# --- multiple choice ---------------------------------------------------------------------------


def test_accuracy_equals_a_hand_computation(graphmoe_model):
    model, tokenizer = graphmoe_model
    examples = _examples()
    by_hand = [e.choices[int(_hand_label_logits(model, tokenizer, e).argmax())] for e in examples]
    # Right answers on examples 0, 1 and 3 only: two wrong by construction.
    answers = [p if i in (0, 1, 3) else next(c for c in e.choices if c != p)
               for i, (p, e) in enumerate(zip(by_hand, examples, strict=True))]
    result = multiple_choice_accuracy(model, tokenizer, _examples(answers), batch_size=2)
    assert result.predictions == tuple(by_hand)
    assert (result.correct, result.total) == (3, 5)
    assert result.accuracy == pytest.approx(0.6)
    for scores, example in zip(result.scores, examples, strict=True):
        torch.testing.assert_close(torch.tensor(scores), _hand_label_logits(model, tokenizer,
                                                                            example))


@pytest.mark.parametrize("which", ["base", "graphmoe"])
def test_padding_never_changes_the_answer(which, base, graphmoe_model):
    model, tokenizer = base if which == "base" else graphmoe_model
    examples = _examples()
    lengths = {len(tokenizer(e.prompt)["input_ids"]) for e in examples}
    assert len(lengths) == len(examples)  # every batch below holds padding
    one = multiple_choice_accuracy(model, tokenizer, examples, batch_size=1)
    for batch_size in (2, 5):
        batched = multiple_choice_accuracy(model, tokenizer, examples, batch_size=batch_size)
        assert batched.predictions == one.predictions
        torch.testing.assert_close(torch.tensor([s for r in batched.scores for s in r]),
                                   torch.tensor([s for r in one.scores for s in r]))


def test_the_mode_comes_back_and_no_gradient_is_kept(graphmoe_model):
    model, tokenizer = graphmoe_model
    model.train()
    try:
        multiple_choice_accuracy(model, tokenizer, _examples()[:2])
        assert model.training
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_a_model_with_nan_weights_is_refused_not_scored():
    # argmax over NaN logits picks the first label everywhere: a plausible accuracy. A model
    # whose adapter a diverged run filled with NaN must not get one.
    model, tokenizer = _converted_builtin()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B_down" in name:
                p.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"^t.jsonl:\d: the model's logits .* are not finite"):
        multiple_choice_accuracy(model, tokenizer, _examples())


def test_a_label_that_is_not_one_token_is_one_line(base):
    model, tokenizer = base
    prompt, _ = render_multiple_choice("Where does Ann live?", ["Paris", "Rome"])
    bad = Example(prompt, " Zqxj", ("Zqxj", "A"), "Zqxj", "f.jsonl:3")
    with pytest.raises(ValueError, match="label ' Zqxj' is not one token") as info:
        multiple_choice_accuracy(model, tokenizer, [bad])
    assert "\n" not in str(info.value)


def test_an_instruction_example_is_refused_by_name(base):
    model, tokenizer = base
    with pytest.raises(ValueError, match=r"^f.jsonl:7: not a multiple-choice example"):
        multiple_choice_accuracy(model, tokenizer, [Example("Say hi", " hi", source="f.jsonl:7")])
    with pytest.raises(ValueError, match="no examples"):
        multiple_choice_accuracy(model, tokenizer, [])


def test_a_long_prompt_keeps_its_end(base):
    model, tokenizer = base
    example = _examples()[2]
    full = len(tokenizer(example.prompt)["input_ids"])
    cut = multiple_choice_accuracy(model, tokenizer, [example], cutoff_len=full - 5)
    ids = tokenizer(example.prompt)["input_ids"]
    kept = torch.tensor([[ids[0], *ids[len(ids) - (full - 6):]]])  # BOS + the last tokens
    with torch.no_grad():
        logits = model(input_ids=kept).logits[0, -1]
    torch.testing.assert_close(torch.tensor(cut.scores[0]),
                               logits[label_token_ids(tokenizer, example.choices)])


# --- perplexity --------------------------------------------------------------------------------


def _manual_perplexity(model, tokenizer, texts, cutoff=None):
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"][:cutoff]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        nll += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def test_perplexity_equals_exp_of_a_manual_nll(graphmoe_model):
    model, tokenizer = graphmoe_model
    texts = ["Ann lives in Paris.", "Where does Ben live? Ben lives in Rome, in Italy.", "Oslo"]
    assert perplexity(model, tokenizer, texts, cutoff_len=512, batch_size=3) == pytest.approx(
        _manual_perplexity(model, tokenizer, texts), rel=1e-5)
    assert perplexity(model, tokenizer, texts, cutoff_len=6, batch_size=2) == pytest.approx(
        _manual_perplexity(model, tokenizer, texts, cutoff=6), rel=1e-5)
    example = Example("Where does Ann live?", " Paris")
    assert perplexity(model, tokenizer, [example]) == pytest.approx(
        _manual_perplexity(model, tokenizer, ["Where does Ann live? Paris"]), rel=1e-5)


def test_perplexity_files(tmp_path):
    txt = tmp_path / "doc.txt"
    txt.write_text("first line\nstill first\n\n\n  \nsecond\n", encoding="utf-8")
    assert read_documents(txt) == ["first line\nstill first", "second"]
    lines = tmp_path / "text.jsonl"
    lines.write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    assert read_documents(lines) == ["one", "two"]
    records = tmp_path / "records.jsonl"
    records.write_text('{"instruction": "Say hi", "output": "hi"}\n', encoding="utf-8")
    [example] = read_documents(records)
    assert isinstance(example, Example) and example.completion.strip() == "hi"
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "one"}\n{"instruction": "x", "output": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"mixed.jsonl:2: no \"text\" field"):
        read_documents(mixed)
    with pytest.raises(ValueError, match="unknown format '.md'"):
        (tmp_path / "a.md").write_text("x")
        read_documents(tmp_path / "a.md")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_documents(tmp_path / "missing.txt")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.txt: not UTF-8 text \(byte 3\)"):
        read_documents(tmp_path / "latin.txt")
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(DataError, match=r"folder\.jsonl: is a directory"):
        read_documents(tmp_path / "folder.jsonl")


# Characters str.splitlines() breaks on that JSON (ensure_ascii=False) leaves raw in a string.
LINE_BREAKS_IN_STRINGS = "a\u2028b\u2029c\x85d"


def test_perplexity_files_split_on_newlines_only(tmp_path):
    lines = tmp_path / "text.jsonl"
    records = [{"text": LINE_BREAKS_IN_STRINGS}, {"text": "two"}]
    lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records)
                     + "{oops\n", encoding="utf-8", newline="")
    with pytest.raises(DataError, match=r"text.jsonl:3: not valid JSON"):
        read_documents(lines)
    lines.write_text('{"text": "one"}\n{"text": "a", "text": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"text.jsonl:2: not valid JSON \(key 'text' is given "
                                        r"twice\)"):
        read_documents(lines)
    lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                     encoding="utf-8")
    assert read_documents(lines) == [LINE_BREAKS_IN_STRINGS, "two"]
    txt = tmp_path / "doc.txt"
    txt.write_text(f"one {LINE_BREAKS_IN_STRINGS}\x0c\x0b\x1cstill one\n\nsecond\n",
                   encoding="utf-8")
    assert read_documents(txt) == [f"one {LINE_BREAKS_IN_STRINGS}\x0c\x0b\x1cstill one",
                                   "second"]


# --- generation --------------------------------------------------------------------------------


def test_greedy_generation_equals_a_manual_loop_without_cache(graphmoe_model):
    model, tokenizer = graphmoe_model
    prompt = "Where does Ann live?"
    ids = list(tokenizer(prompt)["input_ids"])
    start = len(ids)
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
            if ids[-1] == tokenizer.eos_token_id:
                break
    assert generate_ids(model, tokenizer, prompt, max_new_tokens=6) == ids[start:]
    assert generate(model, tokenizer, prompt, max_new_tokens=6) == tokenizer.decode(
        ids[start:], skip_special_tokens=True)


def test_sampling_is_seeded(graphmoe_model):
    model, tokenizer = graphmoe_model
    runs = [generate_ids(model, tokenizer, "Ann", 8, do_sample=True, temperature=2.0, top_p=0.9,
                         seed=s) for s in (3, 3, 4)]
    assert runs[0] == runs[1] and len(runs[0]) <= 8
    with pytest.raises(ValueError, match="top_p"):
        generate_ids(model, tokenizer, "Ann", 2, do_sample=True, top_p=0.0)


# --- the command -------------------------------------------------------------------------------


def _eval(argv, capsys):
    parser = OneLineParser(prog="graphmoe-fused")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    eval_command.add_parser(sub)
    args = parser.parse_args(["eval", *argv])
    status = args.func(args)
    out, err = capsys.readouterr()
    return status, out, err


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _write_mc(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A training output directory (adapter/ inside) for the builtin model, and its data."""
    root = tmp_path_factory.mktemp("eval")
    model, _ = _converted_builtin(seed=3)
    gm.save_adapter(model, root / "run" / "adapter")
    rows = [{"question": q, "choices": c, "answer": i % len(c)}
            for i, (q, c) in enumerate(QUESTIONS)]
    first = _write_mc(root / "first.jsonl", rows[:2])
    second = _write_mc(root / "second.jsonl", rows[2:])
    return root, first, second


def test_eval_puts_base_and_graphmoe_side_by_side(trained, tmp_path, capsys):
    root, first, second = trained
    out = tmp_path / "out"
    status, stdout, err = _eval(["--adapter", str(root / "run"), "--data", first, second,
                                 "--out", str(out), "--device", "cpu"], capsys)
    assert status == 0, err
    files = load_data_files([first, second])
    base_model, tokenizer = load_base_model(None)
    want_base = {f: multiple_choice_accuracy(base_model, tokenizer, ex) for f, ex in files.items()}
    gm.load_adapter(base_model, root / "run" / "adapter")
    want_gm = {f: multiple_choice_accuracy(base_model, tokenizer, ex) for f, ex in files.items()}

    results = json.loads((out / "eval_results.json").read_text())
    for f in files:
        entry = results["files"][f]
        assert entry["n"] == len(files[f])
        assert entry["base"] == want_base[f].accuracy and entry["graphmoe"] == want_gm[f].accuracy
        assert entry["predictions"]["graphmoe"] == list(want_gm[f].predictions)
        assert entry["predictions"]["base"] == list(want_base[f].predictions)
    pooled = sum(r.correct for r in want_gm.values()) / 5
    assert results["overall"]["n"] == 5 and results["overall"]["graphmoe"] == pytest.approx(pooled)

    header, rule, *rows = stdout.splitlines()
    assert header.split() == ["file", "n", "base", "graphmoe"] and set(rule) <= {"-", " "}
    assert rows[2].split() == ["overall", "5", f"{100 * results['overall']['base']:.2f}",
                               f"{100 * pooled:.2f}"]
    assert len({len(line) for line in (header, rule, *rows[:3])}) == 1  # aligned

    routing = json.loads((out / "routing_statistics.json").read_text())
    prompt_tokens = sum(len(encode_prompt(tokenizer, e.prompt, 512))
                        for ex in files.values() for e in ex)
    assert routing["phase"] == "eval" and routing["tokens"] == prompt_tokens
    assert (routing["num_experts"], routing["num_rounds"], routing["top_k"]) == (4, 2, 2)
    assert sorted(routing["layers"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for counts in routing["layers"].values():
        assert [sum(row) for row in counts] == [2 * prompt_tokens] * 2

    # The same directory again: refused, and nothing replaced.
    before = (out / "eval_results.json").read_text()
    status, _, err = _eval(["--adapter", str(root / "run"), "--data", first, "--out", str(out)],
                           capsys)
    assert status == 1 and "not empty: pass --overwrite" in _one_error(err)
    assert (out / "eval_results.json").read_text() == before


def test_base_only_keeps_its_predictions(trained, tmp_path, capsys):
    _, first, _ = trained
    status, _, err = _eval(["--data", first, "--out", str(tmp_path / "o")], capsys)
    assert status == 0, err
    base_model, tokenizer = load_base_model(None)
    want = multiple_choice_accuracy(base_model, tokenizer, load_data_files([first])[first])
    entry = json.loads((tmp_path / "o" / "eval_results.json").read_text())["files"][first]
    assert entry["predictions"] == {"base": list(want.predictions), "graphmoe": None}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_without_a_gpu_is_refused_before_the_base_runs(trained, monkeypatch, capsys):
    root, first, _ = trained
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read at call time by the check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, err = _eval(["--adapter", str(root / "run"), "--data", first,
                            "--backend", "triton", "--device", "cpu"], capsys)
    assert status == 1 and "backend='triton': " in _one_error(err)
    assert "needs a CUDA device" in err and "base:" not in err  # nothing evaluated


def test_a_save_pretrained_checkpoint_gives_the_same_column(trained, tmp_path, capsys):
    root, first, _ = trained
    model, tokenizer = load_base_model(None)
    gm.load_adapter(model, root / "run" / "adapter")
    model.save_pretrained(tmp_path / "ckpt")
    want = multiple_choice_accuracy(model, tokenizer, load_data_files([first])[first])
    status, _, err = _eval(["--adapter", str(tmp_path / "ckpt"), "--data", first, "--no-base",
                            "--out", str(tmp_path / "o")], capsys)
    assert status == 0, err
    entry = json.loads((tmp_path / "o" / "eval_results.json").read_text())["files"][first]
    assert entry["base"] is None and entry["graphmoe_correct"] == want.correct
    assert entry["predictions"]["graphmoe"] == list(want.predictions)


def test_a_checkpoint_of_another_base_is_refused_before_the_base_column(trained, tmp_path,
                                                                         capsys):
    # The checkpoint's column runs its own base, the base column --model's (the builtin here).
    _, first, _ = trained
    model, _ = load_base_model(None, seed=7)
    gm.apply_graphmoe(model, graphmoe_config(num_rounds=1))
    model.save_pretrained(tmp_path / "ckpt")
    argv = ["--adapter", str(tmp_path / "ckpt"), "--data", first]
    status, stdout, err = _eval(argv, capsys)
    assert status == 1 and stdout == "" and "base:" not in err  # nothing evaluated
    assert "holds another base model than --model's" in _one_error(err)
    for flag in ("--no-base", "--allow-other-base"):
        status, _, err = _eval([*argv, flag], capsys)
        assert status == 0, err
    own, _ = load_base_model(None)  # the builtin, --model's default: its checkpoint fits
    gm.apply_graphmoe(own, graphmoe_config(num_rounds=1))
    own.save_pretrained(tmp_path / "own")
    status, _, err = _eval(["--adapter", str(tmp_path / "own"), "--data", first], capsys)
    assert status == 0, err


def test_an_out_folder_that_cannot_hold_the_results_is_refused_before_anything_runs(
        trained, tmp_path, capsys):
    root, first, _ = trained
    (tmp_path / "a-file").write_text("mine")
    status, _, err = _eval(["--data", first, "--out", str(tmp_path / "a-file" / "eval")], capsys)
    assert status == 1 and "base:" not in err
    assert "a-file is not a directory" in _one_error(err)
    # A training run's folder: its routing_statistics.json is the run's, --overwrite or not.
    (root / "run" / "train_config.json").write_text("{}")
    try:
        status, _, err = _eval(["--adapter", str(root / "run"), "--data", first, "--out",
                                str(root / "run"), "--overwrite"], capsys)
    finally:
        (root / "run" / "train_config.json").unlink()
    assert status == 1 and "base:" not in err
    assert "is a training run's: write the evaluation into a folder of its own" in \
        _one_error(err)


def test_an_empty_path_is_a_bad_flag_not_none_given(capsys):
    with pytest.raises(SystemExit) as info:
        _eval(["--adapter", ""], capsys)
    assert info.value.code == 2
    assert "argument --adapter: an empty path" in _one_error(capsys.readouterr().err)


def test_perplexity_and_prompt_without_data(tmp_path, capsys, trained):
    root, _, _ = trained
    doc = tmp_path / "d.txt"
    doc.write_text("Ann lives in Paris.\n\nBen lives in Rome.\n", encoding="utf-8")
    status, stdout, err = _eval(["--adapter", str(root / "run"), "--perplexity", str(doc),
                                 "--prompt", "Ann", "--max-new-tokens", "3", "--out",
                                 str(tmp_path / "o")], capsys)
    assert status == 0, err
    results = json.loads((tmp_path / "o" / "eval_results.json").read_text())
    assert results["files"] == {} and results["overall"] is None  # no builtin split then
    base_model, tokenizer = load_base_model(None)
    texts = ["Ann lives in Paris.", "Ben lives in Rome."]
    assert results["perplexity"]["base"] == pytest.approx(
        _manual_perplexity(base_model, tokenizer, texts), rel=1e-5)
    assert results["generation"]["base"] == generate(base_model, tokenizer, "Ann", 3)
    assert "perplexity of" in stdout and "graphmoe writes:" in stdout


def test_without_data_the_builtin_eval_split_runs(capsys):
    status, stdout, err = _eval(["--batch-size", "16"], capsys)
    assert status == 0, err
    names = [line.split()[0] for line in stdout.splitlines()[2:]]
    assert names == [*builtin_task().eval, "overall"]
    assert stdout.splitlines()[-1].split()[-1] == "-"  # no adapter: no graphmoe column


def test_a_local_checkpoint_as_base(tmp_path, capsys, trained):
    from graphmoe_fused.hf.local_model import save_builtin_model

    _, first, _ = trained
    save_builtin_model(tmp_path / "base")
    model, tokenizer = load_base_model(None)
    want = multiple_choice_accuracy(model, tokenizer, load_data_files([first])[first])
    status, stdout, err = _eval(["--model", str(tmp_path / "base"), "--data", first], capsys)
    assert status == 0, err
    assert stdout.splitlines()[2].split() == [first, "2", f"{100 * want.accuracy:.2f}", "-"]


def test_an_adapter_of_another_base_is_refused_unless_allowed(tmp_path, capsys, trained):
    _, first, _ = trained
    model, _ = load_base_model(None, seed=7)
    gm.apply_graphmoe(model, graphmoe_config(num_rounds=1))
    gm.save_adapter(model, tmp_path / "other")
    argv = ["--adapter", str(tmp_path / "other"), "--data", first, "--no-base"]
    status, stdout, err = _eval(argv, capsys)
    assert status == 1 and stdout == ""
    line = _one_error(err)
    assert "was trained on base model" in line and "--allow-other-base" in line
    status, _, err = _eval([*argv, "--allow-other-base"], capsys)
    assert status == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "was trained on base model" in warning[0]


@pytest.mark.parametrize("case", ["missing", "empty", "architecture", "peft"])
def test_bad_adapters_are_one_line(case, tmp_path, capsys, trained):
    _, first, _ = trained
    adapter = tmp_path / "adapter"
    if case == "empty":
        adapter.mkdir()
    elif case == "architecture":  # the tests' 32-wide LLaMA, not the builtin model
        gm.save_adapter(converted(), adapter)
    elif case == "peft":
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
    status, stdout, err = _eval(["--adapter", str(adapter), "--data", first], capsys)
    line = _one_error(err)
    assert status == 1 and stdout == "", err
    expected = {"missing": "does not exist", "empty": "holds no GraphMoE adapter",
                "architecture": "does not fit this model's architecture",
                "peft": "is a PEFT adapter"}[case]
    assert expected in line, line
    assert "base:" not in err  # refused before the base was evaluated


def test_every_example_of_every_file_is_checked_before_any_model_runs(trained, tmp_path,
                                                                       capsys):
    _, first, _ = trained
    instructions = _write_mc(tmp_path / "inst.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    status, out, err = _eval(["--data", first, instructions], capsys)
    assert status == 1
    assert f"{instructions}:1: not a multiple-choice example" in _one_error(err)
    assert "base:" not in err and not out  # refused before the base column


def test_the_routing_document_format():
    from graphmoe_fused.hf.stats import routing_document

    counts = {"model.layers.1.mlp": torch.tensor([[3, 1, 0], [2, 1, 1]]),
              "model.layers.0.mlp": torch.tensor([[2, 2, 0], [0, 1, 3]])}
    doc = routing_document(counts, num_experts=3, num_rounds=2, top_k=2, phase="eval")
    assert list(doc) == ["num_experts", "num_rounds", "top_k", "phase", "tokens", "layers"]
    assert doc == {"num_experts": 3, "num_rounds": 2, "top_k": 2, "phase": "eval", "tokens": 2,
                   "layers": {"model.layers.1.mlp": [[3, 1, 0], [2, 1, 1]],
                              "model.layers.0.mlp": [[2, 2, 0], [0, 1, 3]]}}
    assert list(doc["layers"]) == list(counts)  # the model's layer order
    given = routing_document(counts, num_experts=3, num_rounds=2, top_k=2, phase="train",
                             tokens=torch.tensor(7))
    assert given["tokens"] == 7 and type(given["tokens"]) is int and given["phase"] == "train"
    assert all(type(v) is int for rows in given["layers"].values() for row in rows for v in row)


def test_evaluation_shares_the_data_and_stats_helpers():
    import importlib

    from graphmoe_fused.data import collate, pad_token_id
    from graphmoe_fused.evaluation import batching, generation, multiple_choice, runner
    from graphmoe_fused.hf import stats

    # (the package's ``perplexity`` is the function, which hides the module of that name)
    perplexity_module = importlib.import_module("graphmoe_fused.evaluation.perplexity")

    assert not hasattr(batching, "pad_id") and not hasattr(batching, "right_padded")
    for module in (generation, multiple_choice, perplexity_module):
        assert module.pad_token_id is pad_token_id
    for module in (multiple_choice, perplexity_module):
        assert module.collate is collate
    assert runner.routing_document is stats.routing_document


@pytest.mark.parametrize("argv, status, message", [
    # Flags that do not go together: a bad command line (2), after parsing.
    (["--temperature", "0.5"], 2, "--temperature applies only with --sample"),
    (["--sample"], 2, "--sample applies only with --prompt"),
    (["--device", "tpu"], 2, "'tpu' is not a device"),
    # Values argparse refuses itself (2).
    (["--prompt", "x", "--top-p", "0"], 2, "0 is not in (0, 1]"),
    (["--batch-size", "0"], 2, "0 is not an integer >= 1"),
    (["--cutoff-len", "1"], 2, "1 is not an integer >= 2"),
    # Inputs refused when the run starts (1).
    (["--no-base"], 1, "--no-base) needs --adapter"),
    (["--data", "nowhere.jsonl"], 1, "nowhere.jsonl"),
    (["--model", "no/such/model"], 1, "no/such/model"),
])
def test_bad_flags_are_one_line(argv, status, message, capsys):
    try:
        got, _, err = _eval(argv, capsys)
    except SystemExit as exc:  # argparse
        got, err = exc.code, capsys.readouterr().err
    assert got == status
    assert message in _one_error(err)
