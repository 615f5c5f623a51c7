"""Prompt data: JSONL / JSON / Parquet, keys, chat template, clear errors, deterministic resumable order."""
from __future__ import annotations

import json

import pytest

from opd_train.rollout.data import PromptDataset, load_prompts


@pytest.fixture(scope="module")
def tokenizer():
    from opd_train.toy.tokenizer import build_tokenizer
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}="
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_json_and_parquet_agree(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"q": "12+3=", "a": "15", "extra": 1}, {"q": "1+1=", "a": "2", "extra": 2}]
    jl = write_jsonl(tmp_path / "p.jsonl", rows)
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    loaded = [load_prompts(p, tokenizer, input_key="q", label_key="a")
              for p in (jl, str(tmp_path / "p.json"), str(tmp_path / "p.parquet"))]
    assert loaded[0] == loaded[1] == loaded[2]
    first = loaded[0][0]
    assert first.text == "12+3=" and first.label == "15" and first.metadata == {"extra": 1}
    assert first.ids == tuple(tokenizer("12+3=")["input_ids"])


def test_chat_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "1+1"}], "label": "2"},
                                                 {"prompt": "2+2", "label": "4"}])
    prompts = load_prompts(path, tokenizer, apply_chat_template=True)
    assert [p.text for p in prompts] == ["[user]1+1=", "[user]2+2="]
    with pytest.raises(ValueError, match="holds chat messages; add --apply-chat-template"):
        load_prompts(path, tokenizer)


def test_chat_ending_with_an_assistant_message_is_continued(tmp_path, tokenizer):
    """A pre-filled answer start is continued: no end of the assistant's turn, no new turn opened after it."""
    chat = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "1+1="}]
    path = write_jsonl(tmp_path / "prefill.jsonl", [{"prompt": chat, "label": "2"}])
    (prompt,) = load_prompts(path, tokenizer, apply_chat_template=True)
    assert prompt.text == "[user]1+1[assistant]1+1="
    assert prompt.ids == tuple(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("content, kwargs, message", [
    ('{"prompt": "1+1="}\n', {"input_key": "question"}, r"no column 'question' \(columns: \['prompt'\]\); set --input-key"),
    ('{"prompt": "1+1="}\n', {"require_labels": True}, r"no label in column 'label'"),
    ('{"prompt": 3}\n', {}, "must be a string or a list of chat messages"),
    ("{bad json\n", {}, r"p.jsonl:1: not valid JSON"),
    ("\n", {}, "no prompts"),
])
def test_clear_errors(tmp_path, tokenizer, content, kwargs, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(str(path), tokenizer, **kwargs)


def test_dataset_order_is_a_function_of_seed_and_step(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i}+0=", "label": str(i)} for i in range(10)])
    prompts = load_prompts(path, tokenizer)
    a, b = PromptDataset(prompts, shuffle=True, seed=3), PromptDataset(prompts, shuffle=True, seed=3)
    first = [a.batch(k, 4) for k in range(5)]
    assert [b.batch(k, 4) for k in (4, 0, 2, 1, 3)] == [first[k] for k in (4, 0, 2, 1, 3)]   # any order (resume)
    epoch0 = [p.label for k in range(2) for p in a.batch(k, 5)]
    assert sorted(epoch0) == sorted(str(i) for i in range(10))                           # a permutation per epoch
    plain = PromptDataset(prompts, shuffle=False, seed=3)
    assert [p.label for p in plain.batch(2, 4)] == ["8", "9", "0", "1"]                 # wraps into the next epoch
