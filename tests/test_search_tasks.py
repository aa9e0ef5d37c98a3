"""Task loaders: the local evaluation data, user JSONL files, malformed records."""

import json

import pytest

from retrofit.core.data import Example, TaskDataError, extract_number, load_task, numbers_match


@pytest.fixture
def data(shared_data, monkeypatch):
    monkeypatch.setenv("RETROFIT_DATA", str(shared_data))
    return shared_data


@pytest.mark.parametrize("name,split,n,n_choices", [
    ("arc_easy", "train", 2251, 4), ("arc_easy", "validation", 570, None), ("arc_challenge", "test", 1172, None),
    ("arc_challenge", "validation", 299, None), ("piqa", None, 1838, 2), ("hellaswag", None, 10042, 4),
    ("boolq", None, 3270, 2), ("openbookqa", None, 500, 4), ("copa", None, 100, 2), ("winogrande", None, 1267, 2),
    ("mmlu", "dev", 285, 4), ("xcopa_it", "val", 100, 2), ("xcopa_gmt_sw", "test", 500, 2),
    ("gsm8k", "test", 1319, 0), ("mgsm_de", None, 250, 0),
])
def test_local_tasks_load_whole(data, name, split, n, n_choices):
    exs = load_task(name, split)
    assert len(exs) == n
    assert len({e.id for e in exs}) == n
    if n_choices is not None:
        assert all(e.n_choices == n_choices for e in exs[:50])
    for e in exs[:50]:
        if e.kind == "mc":
            assert 0 <= e.gold < e.n_choices and len(e.requests()) == e.n_choices
        else:
            assert float(e.gold) == float(e.gold) and e.prompt.endswith("\nAnswer:")


def test_prompts_follow_lm_eval(data):
    e = load_task("arc_easy", "train", limit=1)[0]
    assert e.prompt == ("Question: Which factor will most likely cause a person to develop a fever?\nAnswer:")
    assert e.requests()[1] == (e.prompt, " a bacterial population in the bloodstream") and e.gold == 1
    w = load_task("winogrande", limit=1)[0]  # partial scoring: contexts differ, one continuation
    assert [r[1] for r in w.requests()] == [" always got the easier cases."] * 2
    assert w.requests()[0][0].endswith("so Sarah") and w.requests()[1][0].endswith("so Maria")
    g = load_task("gsm8k", "train", limit=1)[0]
    assert g.kind == "gen" and g.gold == "72" and g.prompt.startswith("Question: Natalia")
    m = load_task("mmlu_abstract_algebra", "dev", limit=1)[0]
    assert m.prompt.endswith("D. 3\nAnswer:") and m.choices == ["A", "B", "C", "D"] and m.gold == 1
    x = load_task("xcopa_gmt_it", "val", limit=1)[0]
    assert x.prompt == "The man turned on the tap therefore" and x.choices[1] == "water flowed from the spout."
    assert len(load_task("arc_easy", "train", limit=7)) == 7


def test_user_jsonl_formats(tmp_path):
    p = tmp_path / "mine.jsonl"
    recs = [
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
        {"question": "sky?", "choices": ["blue", "green"], "answer": "blue"},
        {"question": "pick", "choices": ["x", "y", "z"], "answer": "C"},
        {"id": "q4", "question": "arc style", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answer": "2"},
        {"question": "How many?", "answer": 12},
    ]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    exs = load_task(str(p))
    assert [e.gold for e in exs] == [1, 0, 2, 1, "12"]
    assert exs[3].id == "q4" and exs[0].prompt == "Question: 2+2?\nAnswer:"
    assert exs[4].kind == "gen"


@pytest.mark.parametrize("line,msg", [
    ('{"question": "q", "choices": ["a", "b"]}', "missing field 'answer'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 5}', "not an index"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "zzz"}', "neither an index"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least 2 choices"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0', "not valid JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
])
def test_malformed_records_name_file_and_line(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "ok", "choices": ["a", "b"], "answer": 0}\n\n' + line + "\n")
    with pytest.raises(TaskDataError, match=msg) as e:
        load_task(str(p))
    assert f"{p}:3:" in str(e.value)


def test_unknown_task_and_split(data):
    with pytest.raises(TaskDataError, match="unknown task"):
        load_task("nope")
    with pytest.raises(TaskDataError, match="splits"):
        load_task("arc_easy", "bogus")


def test_number_extraction():
    assert extract_number("so she makes 9 * 2 = $18.\n") == "18"
    assert extract_number("The answer is 1,234.") == "1234"
    assert extract_number("no digits") is None
    assert numbers_match("18.0", "18") and not numbers_match("17", "18") and not numbers_match(None, "1")
    assert Example("a", "p", [], "3", kind="gen").kind == "gen"
