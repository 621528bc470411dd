"""Chat data readers: the four record forms, cleaning, the skip report, truncation, bad files."""

from __future__ import annotations

import gzip
import json

import pytest

from azgpt.chat_template import render_chat
from azgpt.chatdata import load_chats, split_val
from azgpt.errors import UserError

CONV = [
    {"role": "system", "content": "Sən nəzakətli köməkçisən."},
    {"role": "user", "content": "Bakı haradadır?"},
    {"role": "assistant", "content": "Bakı Xəzər dənizinin sahilindədir."},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def test_all_four_forms_give_the_same_conversation(tok, tmp_path):
    user, reply = "Bakı haradadır?", "Bakı Xəzər dənizinin sahilindədir."
    recs = [
        {"messages": CONV[1:]},
        {"messages": json.dumps(CONV[1:], ensure_ascii=False)},  # a JSON string of the list
        {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": reply}]},
        {"instruction": user, "input": "", "output": reply},
        {"prompt": user, "completion": reply},
    ]
    convs, rep = load_chats([write_jsonl(tmp_path / "c.jsonl", recs)], tok, 256)
    assert rep.conversations == 5 and not rep.skipped
    assert all(c.messages == CONV[1:] for c in convs)
    assert all(c.ids == render_chat(tok, CONV[1:])[0] for c in convs)


def test_alpaca_input_joins_the_instruction_after_a_blank_line(tok, tmp_path):
    p = write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": "Qısalt:", "input": "Uzun mətn.", "output": "Mətn."}]
    )
    (c,), _ = load_chats([p], tok, 256)
    assert c.messages[0] == {"role": "user", "content": "Qısalt:\n\nUzun mətn."}


def test_text_is_cleaned_but_never_lowercased_nor_reflowed(tok, tmp_path):
    mojibake = "AzÉ™rbaycanÄ±n"  # UTF-8 read as cp1252
    decomposed = "Ş".replace("Ş", "S\u0327") + "əki"  # NFD Ş
    reply = f"İlk sətir\n\n  ikinci sətir, {decomposed}, ǝla IıİiIİ"
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": f"  {mojibake} paytaxtı?  "},
        {"role": "assistant", "content": reply},
    ]}])  # fmt: skip
    (c,), rep = load_chats([p], tok, 256)
    assert c.messages[0]["content"] == "Azərbaycanın paytaxtı?"
    assert c.messages[1]["content"] == "İlk sətir\n\n  ikinci sətir, Şəki, əla IıİiIİ"
    assert rep.cleaning["nfc"] >= 1


def test_unusable_records_are_skipped_and_counted_by_kind_with_first_lines(tok, tmp_path):
    good = {"messages": CONV}
    long_reply = "söz " * 400
    lines = [
        json.dumps(good, ensure_ascii=False),  # 1
        "{not json",  # 2 bad_json
        json.dumps({"text": "sadəcə mətn"}),  # 3 unknown_format
        json.dumps({"messages": [{"role": "tool", "content": "x"}, CONV[2]]}),  # 4 unknown_role
        json.dumps({"messages": [CONV[1]]}),  # 5 no_assistant_turn
        json.dumps({"messages": [CONV[1], {"role": "assistant", "content": "   "}]}),  # 6 empty
        json.dumps({"messages": [CONV[1], {"role": "assistant", "content": 5}]}),  # 7 non_string
        json.dumps({"messages": [CONV[1], {"role": "assistant", "content": "a<|user|>b"}]}),  # 8
        json.dumps({"messages": [CONV[1], {"role": "assistant", "content": long_reply}]}),  # 9
        json.dumps({"messages": "[oops"}),  # 10 bad_json inside the string form
        json.dumps(good, ensure_ascii=False),  # 11
    ]
    p = tmp_path / "mix.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    convs, rep = load_chats([p], tok, 128)
    d = rep.as_dict()
    assert d["records"] == 11 and d["conversations"] == 2 == len(convs)
    want = {
        "bad_json": [2, 10],
        "unknown_format": [3],
        "unknown_role": [4],
        "no_assistant_turn": [5],
        "empty_assistant_text": [6],
        "non_string_content": [7],
        "spells_special_token": [8],
        "too_long": [9],
    }
    assert set(d["skipped"]) == set(want)
    for kind, where in want.items():
        assert d["skipped"][kind]["count"] == len(where)
        assert d["skipped"][kind]["first"] == [f"{p}:{n}" for n in where]
    json.dumps(d)  # the report is JSON


def test_truncation_keeps_the_longest_prefix_ending_with_an_assistant_turn(tok, tmp_path):
    turns = []
    for k in range(6):
        turns += [
            {"role": "user", "content": f"Sual {k}: Gəncə haqqında danış."},
            {"role": "assistant", "content": f"Cavab {k}: Gəncə qədim şəhərdir."},
        ]
    full = len(render_chat(tok, turns)[0])
    p = write_jsonl(tmp_path / "t.jsonl", [{"messages": turns}])
    (c,), rep = load_chats([p], tok, full - 1)
    assert rep.truncated == 1
    assert c.messages == turns[: len(c.messages)] and c.messages[-1]["role"] == "assistant"
    assert len(c.messages) == 10 and len(c.ids) <= full - 1


def test_gzip_json_list_and_parquet_and_folders(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "set"
    (d / "sub").mkdir(parents=True)
    with gzip.open(d / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"messages": CONV}, ensure_ascii=False) + "\n")
    (d / "sub" / "b.json").write_text(
        json.dumps([{"prompt": "Salam", "completion": "Salam!"}]), "utf-8"
    )
    table = pa.table({"messages": [CONV[1:]]})  # a list of structs, as published sets store it
    pq.write_table(table, d / "c.parquet")
    (d / "notes.txt").write_text("not chat data", "utf-8")  # ignored inside a folder
    convs, rep = load_chats([d], tok, 256)
    assert rep.conversations == 3 and len(rep.files) == 3
    assert sorted(c.where.rsplit("/", 1)[1] for c in convs) == [
        "a.jsonl.gz:1",
        "b.json:record 1",
        "c.parquet:1",
    ]
    assert all(c.messages[-2:] == CONV[1:] for c in convs if "parquet" in c.where)


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "is empty"),
        ("{bad\n[also bad\n", r"no usable conversation in .*bad_json 2"),
        (
            json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n",
            "no_assistant_turn 1",
        ),
    ],
)
def test_a_file_with_nothing_usable_is_one_sentence(tok, tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=match):
        load_chats([p], tok, 256)


def test_legacy_encoding_is_refused_with_the_fix(tok, tmp_path):
    p = tmp_path / "cp.jsonl"
    rec = {
        "messages": [
            {"role": "user", "content": "Şəki?"},
            {"role": "assistant", "content": "Bəli, Şəki."},
        ]
    }
    p.write_bytes(json.dumps(rec, ensure_ascii=False).replace("ə", "e").encode("cp1254") + b"\n")
    with pytest.raises(UserError, match=r"is not UTF-8 \(line 1\).*iconv"):
        load_chats([p], tok, 256)


def test_wrong_suffix_and_missing_path(tok, tmp_path):
    (tmp_path / "x.txt").write_text("a", "utf-8")
    with pytest.raises(UserError, match="not a .jsonl"):
        load_chats([tmp_path / "x.txt"], tok, 256)
    with pytest.raises(UserError, match="does not exist"):
        load_chats([tmp_path / "nope.jsonl"], tok, 256)


def test_val_split_is_stable_and_disjoint(tok, tmp_path):
    recs = [{"prompt": f"Sual {i}", "completion": f"Cavab {i}"} for i in range(40)]
    convs, _ = load_chats([write_jsonl(tmp_path / "c.jsonl", recs)], tok, 256)
    tr, va = split_val(convs, 0.1)
    assert len(va) == 4 and len(tr) == 36
    tr2, va2 = split_val(list(reversed(convs)), 0.1)
    assert {c.where for c in va} == {c.where for c in va2}
    assert split_val(convs[:2], 0.01)[1]  # at least one held out


def test_the_project_chat_set_loads_whole(tok):
    from pathlib import Path

    d = Path(__file__).resolve().parent.parent / "data" / "chat"
    convs, rep = load_chats([d], tok, 512)
    assert rep.conversations == rep.records >= 300 and not rep.skipped
    assert sum(any(m["role"] == "system" for m in c.messages) for c in convs) >= 20
    assert sum(sum(m["role"] == "user" for m in c.messages) >= 2 for c in convs) >= 20
    text = " ".join(m["content"] for c in convs for m in c.messages)
    assert all(ch in text for ch in "əıİşçğöüƏŞÇÖÜ")
