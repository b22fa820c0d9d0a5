"""Readers, format adapters, auto-detection and every rejection reason."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from keel.data.formats import ROLES, Reject, detect_format, to_canonical, validate
from keel.data.sources import detect_source_format, iter_rows, iter_source, load_conversations

SHARED = Path(__file__).resolve().parents[2].parent / "shared/data/sft"

GLAIVE_ROW = {
    "conversations": [
        {"from": "human", "value": "What's the weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp_c": 18}'},
        {"from": "gpt", "value": "It is 18 C in Paris."},
    ],
    "tools": '[{"name": "get_weather", "description": "Weather now", "parameters": {"type": "object"}}]',
}
SHAREGPT_ROW = {"id": "x", "conversations": [
    {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
    {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one(row: dict, fmt: str = "auto", fields: dict | None = None, tmp: Path | None = None) -> dict | Reject:
    """Run one row through the whole reader + adapter + validation path."""
    (_, _, item), = iter_rows(str(_write_jsonl(tmp / "one.jsonl", [row])), fmt, fields)
    return item


def _reason(row: dict, tmp: Path, fmt: str = "auto", fields: dict | None = None) -> str:
    item = _one(row, fmt, fields, tmp)
    assert isinstance(item, Reject), item
    return str(item)


# ---------------------------------------------------------------- adapters


def test_roles_include_tool():
    assert ROLES == ("system", "user", "assistant", "tool")


def test_openai_messages_with_tool_calls():
    row = {"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"expr": "2+2"}'}}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "4."}]}],
        "tools": [{"type": "function", "function": {"name": "calc"}}]}
    ex = to_canonical(row, "messages")
    assert validate(ex) is None
    assert ex["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calc", "arguments": {"expr": "2+2"}}}]}
    assert ex["messages"][3]["content"] == "It is 4."
    assert ex["tools"] == row["tools"]


def test_sharegpt_conversation():
    ex = to_canonical(SHAREGPT_ROW, "sharegpt")
    assert validate(ex) is None
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert ex["messages"][2]["content"] == "Hello!" and "tools" not in ex


def test_glaive_tool_call_conversation():
    ex = to_canonical(GLAIVE_ROW, "sharegpt")
    assert validate(ex) is None
    assert [m["role"] for m in ex["messages"]] == ["user", "assistant", "tool", "assistant"]
    call = ex["messages"][1]
    assert call["content"] == "" and call["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert ex["messages"][2] == {"role": "tool", "content": '{"temp_c": 18}'}
    assert ex["tools"][0]["name"] == "get_weather"  # JSON string parsed into a list


def test_function_call_after_assistant_text_joins_that_turn():
    row = {"conversations": [{"from": "human", "value": "Book it"}, {"from": "gpt", "value": "Booking."},
                             {"from": "function_call", "value": '{"name": "book", "arguments": {}}'},
                             {"from": "observation", "value": "ok"}, {"from": "gpt", "value": "Done."}],
           "tools": ""}
    ex = to_canonical(row, "sharegpt")
    assert validate(ex) is None and "tools" not in ex
    assert ex["messages"][1]["content"] == "Booking." and ex["messages"][1]["tool_calls"][0]["function"][
        "name"] == "book"


def test_alpaca_with_input_system_and_history():
    row = {"instruction": "Translate", "input": "chat", "output": "cat", "system": "You translate.",
           "history": [["Translate: chien", "dog"]]}
    ex = to_canonical(row, "alpaca")
    assert validate(ex) is None
    assert ex["messages"] == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Translate: chien"}, {"role": "assistant", "content": "dog"},
        {"role": "user", "content": "Translate\nchat"}, {"role": "assistant", "content": "cat"}]
    plain = to_canonical({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca")
    assert plain["messages"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


def test_prompt_completion_strings_and_conversational():
    ex = to_canonical({"prompt": "Q", "completion": "A"}, "prompt_completion")
    assert ex["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    conv = to_canonical({"prompt": [{"role": "user", "content": "Q"}],
                         "completion": [{"role": "assistant", "content": "A"}]}, "prompt_completion")
    assert conv == ex


def test_gsm8k_and_text():
    ex = to_canonical({"question": "1+1?", "answer": "1+1=2\n#### 2"}, "gsm8k")
    assert ex["messages"][1] == {"role": "assistant", "content": "1+1=2\n#### 2"}
    assert to_canonical({"text": "hello"}, "text") == {"text": "hello"}


def test_custom_field_names(tmp_path):
    fields = {"messages": "conversations", "role": "from", "content": "value"}
    row = {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Yo"}]}
    ex = _one(row, "messages", fields, tmp_path)
    assert ex == {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    ex = _one({"q": "Why?", "a": "Because."}, "auto", {"question": "q", "answer": "a"}, tmp_path)
    assert ex["messages"][0]["content"] == "Why?"
    with pytest.raises(ValueError, match="not used by format"):
        list(iter_rows(str(tmp_path / "one.jsonl"), "alpaca", {"role": "from"}))


# ---------------------------------------------------------------- auto-detection


@pytest.mark.parametrize("row, fmt", [
    ({"messages": []}, "messages"), (SHAREGPT_ROW, "sharegpt"), (GLAIVE_ROW, "sharegpt"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"), ({"prompt": "a", "completion": "b"},
                                                                   "prompt_completion"),
    ({"question": "a", "answer": "b"}, "gsm8k"), ({"text": "a"}, "text"), ({"foo": 1}, None), ([1], None)])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_auto_uses_first_valid_row_and_reports_it(tmp_path, caplog):
    rows = ["not json", {"foo": 1}, {"question": "a", "answer": "b"}, {"question": "c"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    with caplog.at_level("INFO", logger="keel.data.sources"):
        items = list(iter_rows(str(path)))
    assert "chose 'gsm8k'" in caplog.text
    assert detect_source_format(str(path)) == "gsm8k"
    assert [(r, isinstance(x, Reject)) for _, r, x in items] == [(0, True), (1, True), (2, False), (3, True)]
    assert "malformed JSON line" in str(items[0][2])
    assert "question: missing required field for format gsm8k" in str(items[1][2])


def test_auto_with_no_known_format_rejects_every_row(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"foo": 1}, {"bar": 2}])
    items = list(iter_rows(str(path)))
    assert len(items) == 2 and all("no row has the fields of a known format" in str(x) for _, _, x in items)
    with pytest.raises(ValueError, match="no row has the fields"):
        detect_source_format(str(path))


# ---------------------------------------------------------------- rejection reasons

REJECTIONS = [
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role: unknown role 'bot'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "must start with a user turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "4"}]},
     "messages[1].role: wrong turn order, tool result without a preceding assistant tool call"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "messages[1].role: wrong turn order, two consecutive user turns"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "two consecutive assistant turns"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "messages[1].role: system message after the first turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
     "messages[1].content: empty"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]},
     "messages[1].content: wrong type, expected a string, got int"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages: no assistant turn"),
    ({"messages": "hello"}, "messages: wrong type, expected a list, got str"),
    ({"messages": [{"content": "a"}]}, "messages[0].role: missing required field"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{oops"}]},
     "conversations[1].value: malformed JSON in function call"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "tools": "[{"},
     "tools: malformed JSON"),
    ({"instruction": "a", "output": ["b"]}, "output: wrong type, expected a string, got list"),
    ({"instruction": "a", "output": ""}, "output: empty"),
    ({"question": "a", "answer": None}, "answer: missing required field for format gsm8k"),
    ({"text": "bad \udc80 bytes"}, "text: invalid Unicode (lone surrogate)"),
]


@pytest.mark.parametrize("row, reason", REJECTIONS)
def test_rejection_reasons(tmp_path, row, reason):
    got = _reason(row, tmp_path)
    assert reason in got, got


def test_missing_required_field_for_chosen_format(tmp_path):
    assert "instruction: missing required field for format alpaca" in _reason({"output": "b"}, tmp_path,
                                                                               "alpaca")
    assert "row: wrong type, expected an object, got list" in _reason([1, 2], tmp_path, "text")


def test_malformed_and_undecodable_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": \n\n\xff\xfe{"text": "x"}\n{"text": "fine"}\n')
    items = [(r, str(x) if isinstance(x, Reject) else x) for _, r, x in iter_rows(str(path), "text")]
    assert items[0] == (0, {"text": "ok"}) and items[3] == (4, {"text": "fine"})
    assert items[1][0] == 1 and items[1][1].startswith("malformed JSON line")
    assert items[2][0] == 3 and items[2][1].startswith("undecodable bytes")


def test_oversized_number_is_a_malformed_line_not_a_crash(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"text": ' + "9" * 5000 + "}\n")
    (item,) = [x for _, _, x in iter_rows(str(path), "text")]
    assert "malformed JSON line" in str(item)


def test_reject_keeps_the_raw_row(tmp_path):
    item = _one({"instruction": "a", "output": ""}, "alpaca", None, tmp_path)
    assert item.data == {"instruction": "a", "output": ""}


def test_validate_keeps_the_canonical_contract():
    assert validate({"text": ""}) == "text: empty"
    assert validate("x") == "row: wrong type, expected an object, got str"
    assert validate({"messages": []}) == "messages: empty"
    bad_call = {"messages": [{"role": "user", "content": "a"},
                             {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]}
    assert "tool_calls[0].function.name" in validate(bad_call)
    tool_calls_on_user = {"messages": [{"role": "user", "content": "a", "tool_calls": []}]}
    assert "only assistant messages can call tools" in validate(tool_calls_on_user)


# ---------------------------------------------------------------- readers

QA = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]


def _valid(path: str, **kw) -> list[dict]:
    return list(load_conversations(path, **kw))


def test_json_list_and_object_with_data_key(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(QA))
    (tmp_path / "obj.json").write_text(json.dumps({"version": 1, "data": QA}))
    assert len(_valid(str(tmp_path / "list.json"))) == 3
    assert _valid(str(tmp_path / "obj.json")) == _valid(str(tmp_path / "list.json"))


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "lines.json", QA)
    assert len(_valid(str(path))) == 3


def test_malformed_json_file_is_one_reject(tmp_path):
    (tmp_path / "bad.json").write_text('[{"text": "a"}, {"te')
    (item,) = iter_rows(str(tmp_path / "bad.json"), "text")
    assert isinstance(item[2], Reject) and "malformed JSON file" in str(item[2])


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(QA), tmp_path / "qa.parquet")
    ex = _valid(str(tmp_path / "qa.parquet"))
    assert [e["messages"][0]["content"] for e in ex] == ["q0", "q1", "q2"]


def test_csv_values_are_strings_and_bad_rows_are_rejected(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_bytes(b'question,answer\nq0,"a, 0"\nq1\n\n\xff,a2\n"q3",a3\n')
    items = [(r, x) for _, r, x in iter_rows(str(path))]
    assert items[0] == (0, {"messages": [{"role": "user", "content": "q0"},
                                         {"role": "assistant", "content": "a, 0"}]})
    assert "malformed CSV row: 1 fields" in str(items[1][1])
    assert "undecodable bytes" in str(items[2][1])
    assert items[3][0] == 3 and not isinstance(items[3][1], Reject)


def test_csv_json_string_column(tmp_path):
    path = tmp_path / "chat.csv"
    conv = json.dumps([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}])
    path.write_text('conversations\n"' + conv.replace('"', '""') + '"\n')
    assert _valid(str(path))[0]["messages"][1] == {"role": "assistant", "content": "yo"}


def test_glob_is_sorted_and_rows_are_numbered_per_file(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        _write_jsonl(tmp_path / name, QA[:2])
    (tmp_path / "c.json").write_text(json.dumps(QA[:1]))
    items = [(Path(f).name, r) for f, r, _ in iter_rows(str(tmp_path / "*.json*"))]
    assert items == [("a.jsonl", 0), ("a.jsonl", 1), ("b.jsonl", 0), ("b.jsonl", 1), ("c.json", 0)]


def test_user_errors_are_value_errors(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="not found"):
        list(iter_rows(str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="no files match"):
        list(iter_rows(str(tmp_path / "*.parquet")))
    with pytest.raises(ValueError, match="unsupported file type"):
        list(iter_rows(str(tmp_path / "x.txt")))
    with pytest.raises(ValueError, match="unknown data format"):
        list(iter_rows(str(tmp_path / "x.txt"), "yaml"))


def test_hugging_face_local_folder_streaming(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", QA)
    ex = _valid(str(folder), streaming=True)
    assert [e["messages"][1]["content"] for e in ex] == ["a0", "a1", "a2"]


def test_iter_source_reads_files_for_the_pipeline(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [QA[0], {"question": "x"}, QA[1]])
    src = SimpleNamespace(kind="file", path=str(path), num_examples=-1)
    out = list(iter_source(src, seed=0))
    assert [r for r, _ in out] == [0, 1, 2] and isinstance(out[1][1], Reject)
    assert validate(out[0][1]) is None
    # a file is read whole (num_examples sizes demo sources; a cap applies to the examples kept, in load_source)
    whole = SimpleNamespace(kind="file", path=str(path), num_examples=2, format="gsm8k")
    assert len(list(iter_source(whole, seed=0))) == 3


# ---------------------------------------------------------------- shared data (when present)

SHARED_FORMATS = {"alpaca_en_demo.json": "alpaca", "glaive_toolcall_en_demo.json": "sharegpt",
                  "gsm8k_train.jsonl": "gsm8k", "sharegpt_dummy_conversation.json": "sharegpt"}


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")
@pytest.mark.parametrize("name, fmt", sorted(SHARED_FORMATS.items()))
def test_shared_sft_files(name, fmt):
    path = str(SHARED / name)
    assert detect_source_format(path) == fmt
    items = [x for _, _, x in iter_rows(path)]
    valid = sum(not isinstance(x, Reject) for x in items)
    assert items and valid >= 0.95 * len(items)


@pytest.mark.parametrize("key", ["reasoning_content", "thinking"])
@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_reasoning_traces_are_read_from_every_chat_format(fmt, key):
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", key: "add them"}]
    if fmt == "sharegpt":
        turns = [{"from": t["role"], "value": t["content"], **({key: t[key]} if key in t else {})} for t in turns]
        row = {"conversations": turns}
    else:
        row = {"messages": turns}
    ex = to_canonical(row, fmt)
    assert ex["messages"][1]["reasoning_content"] == "add them" and validate(ex) is None


def test_reasoning_in_prompt_completion_and_its_errors():
    row = {"prompt": [{"role": "user", "content": "q"}],
           "completion": [{"role": "assistant", "content": "a", "thinking": "t"}]}
    assert to_canonical(row, "prompt_completion")["messages"][1]["reasoning_content"] == "t"
    with pytest.raises(Reject, match=r"messages\[1\].thinking: wrong type"):
        to_canonical({"messages": [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "a", "thinking": 3}]}, "messages")
    bad = {"messages": [{"role": "user", "content": "q", "reasoning_content": "r"},
                        {"role": "assistant", "content": "a"}]}
    assert validate(bad) == "messages[0].reasoning_content: only assistant messages carry reasoning"
