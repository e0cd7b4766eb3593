"""User dataset loading: JSONL errors, chat messages, splits, datasets-on-disk round trip."""

import json

import pytest

from opdkit.tasks import DatasetError, format_prompt, load_examples


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_basic(tmp_path):
    f = write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "1+1?", "answer": 2, "solution": "1+1=2 #### 2"}),
        "",
        json.dumps({"prompt": "2+2?", "answer": "4", "solution": "#### 4"}),
    ])
    ex = load_examples(f, completion_field="solution")
    assert [(e.prompt, e.answer, e.completion) for e in ex] == [("1+1?", "2", "1+1=2 #### 2"), ("2+2?", "4", "#### 4")]
    assert ex[1].meta["line"] == 3 and ex[1].meta["source"] == str(f)
    assert load_examples(str(f), answer_field=None)[0].answer == ""


def test_json_array_file(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"q": "a", "answer": "b"}]))
    assert load_examples(f, prompt_field="q")[0].prompt == "a"


@pytest.mark.parametrize(
    "lines, kwargs, pattern",
    [
        (['{"prompt": "a", "answer": "b"}', '{"prompt": "a", "answer": }'], {}, r"d\.jsonl line 2: invalid JSON"),
        (['{"prompt": "a", "answer": "b"}', '{"question": "a", "answer": "b"}'], {},
         r"line 2: missing field 'prompt' \(fields present: answer, question\); .*prompt_field="),
        (['{"prompt": "a"}'], {}, r"line 1: missing field 'answer'.*answer_field="),
        (['{"prompt": "a", "answer": "b"}'], {"completion_field": "sol"}, r"line 1: missing field 'sol'"),
        (['[1, 2]', '[3]'], {}, r"line 1: expected a JSON object, got list"),
        (['[{"prompt": "a", "answer": "b"}, 2]'], {}, r"item 2: expected a JSON object, got int"),
        (['{"prompt": ["a"], "answer": "b"}'], {}, r"line 1: field 'prompt' \(prompt\) is list"),
        ([], {}, r"empty"),
        (["", "   "], {}, r"empty"),
        (['{"prompt": "a", "answer": "b"}'], {"split": "test"}, r"unknown split 'test'"),
    ],
)
def test_jsonl_errors(tmp_path, lines, kwargs, pattern):
    f = write(tmp_path / "d.jsonl", lines)
    with pytest.raises(DatasetError, match=pattern) as info:
        load_examples(f, **kwargs)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value) and str(f) in str(info.value)


def test_missing_path_and_plain_dir(tmp_path):
    with pytest.raises(DatasetError, match="never the Hub"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="not a saved dataset"):
        load_examples(tmp_path)


def test_messages(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    f = write(tmp_path / "c.jsonl", [json.dumps({"messages": msgs, "answer": "4"}), json.dumps({"messages": msgs[:2], "answer": "4"})])
    a, b = load_examples(f, messages_field="messages")
    assert a.prompt == "2+2?" and a.completion == "4" and a.meta["messages"] == msgs[:2]
    assert b.completion is None and b.meta["messages"] == msgs[:2]
    assert format_prompt(a) == "2+2?"

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "|".join(m["content"] for m in messages) + ">"

    assert format_prompt(a, Tok()) == "be brief|2+2?>"
    bad = write(tmp_path / "bad.jsonl", [json.dumps({"messages": [{"role": "user"}], "answer": "4"})])
    with pytest.raises(DatasetError, match="line 1: field 'messages' must be"):
        load_examples(bad, messages_field="messages")


def test_hash_split_of_user_jsonl(tmp_path):
    f = write(tmp_path / "d.jsonl", [json.dumps({"prompt": f"p{i}", "answer": str(i)}) for i in range(200)])
    train, held = load_examples(f, split="train"), load_examples(f, split="heldout")
    assert len(train) + len(held) == 200 and held
    assert not {e.prompt for e in train} & {e.prompt for e in held}


def test_datasets_on_disk_roundtrip(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"question": ["1+1", "2+3"], "answer": [2, 5]}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    ex = load_examples(tmp_path / "ds", prompt_field="question")
    assert [(e.prompt, e.answer) for e in ex] == [("1+1", "2"), ("2+3", "5")]
    assert ex[0].meta["index"] == 0 and "line" not in ex[0].meta

    dd = datasets.DatasetDict({"train": ds, "test": ds.select([1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [e.prompt for e in load_examples(tmp_path / "dd", prompt_field="question", split="test")] == ["2+3"]
    with pytest.raises(DatasetError, match="splits train, test; pass split="):
        load_examples(tmp_path / "dd", prompt_field="question")
    with pytest.raises(DatasetError, match="missing field 'prompt'"):
        load_examples(tmp_path / "ds")

    datasets.Dataset.from_dict({"prompt": [], "answer": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="empty"):
        load_examples(tmp_path / "empty")
