"""Chat data (issue 21): messages / prompt_completion formats, templates, end-of-turn stops, teacher checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from promptkd.config import ConfigError, load_config
from promptkd.data import (DataError, Template, build_prompt, end_of_turn_id, load_examples, load_tokenizer,
                           sniff_format, stop_ids, strip_thinking, tokenize_examples, train_tokenizer)
from promptkd.data.chat import check_teacher_tokenizer, eos_for, render_prompt
from promptkd.data.tokenizer import generation_eos_ids
from promptkd.rollout import SamplingParams, generate, rollout_from_responses

TEXTS = [f"the answer to question {i} is {i * 7} and the sky is blue today" for i in range(120)]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Add 2 and 3."},
                      {"role": "assistant", "content": "5"}, {"role": "user", "content": "Now double it."},
                      {"role": "assistant", "content": "10"}]},
        {"id": "b", "messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "blue"}]}]


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for chat in ("chatml", "llama3"):
        train_tokenizer(TEXTS, 400, str(root / chat), chat=chat)
        out[chat] = load_tokenizer(str(root / chat))
    train_tokenizer(TEXTS, 400, str(root / "plain"))
    out["plain"] = load_tokenizer(str(root / "plain"))
    out["root"] = root
    return out


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- formats

def test_messages_last_assistant_is_the_response_and_the_turns_before_the_prompt(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", CHAT)
    assert sniff_format(path) == "messages"
    first, second = load_examples(path, "messages", template="chat")
    assert first.references == ["10"]
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant", "user"]
    assert first.messages[2]["content"] == "5" and first.id == "c.jsonl:1"
    assert second.id == "b" and second.messages == [{"role": "user", "content": "Name a color."}]


def test_prompt_completion_format(tmp_path):
    row = {"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Hello."}]}
    path = _jsonl(tmp_path / "pc.jsonl", [row])
    assert sniff_format(path) == "prompt_completion"
    (ex,) = load_examples(path, "prompt_completion", template="chat")
    assert ex.messages == [{"role": "user", "content": "Hi?"}] and ex.references == ["Hello."]


def test_single_turn_messages_under_alpaca_and_none_templates(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", CHAT[1:])
    assert load_examples(path, "messages", template="alpaca")[0].prompt == build_prompt("Name a color.")
    assert load_examples(path, "messages", template="none")[0].prompt == "Name a color."
    with pytest.raises(DataError, match=r"c\.jsonl:1: data\.template=alpaca takes one user turn"):
        load_examples(_jsonl(tmp_path / "c.jsonl", CHAT[:1]), "messages", template="alpaca")


def test_dolly_and_prepared_records_become_one_user_turn_under_chat(tmp_path):
    dolly = _jsonl(tmp_path / "d.jsonl", [{"instruction": "Sum.", "context": "1 2", "response": "3"}])
    (ex,) = load_examples(dolly, "dolly", template="chat")
    assert ex.messages == [{"role": "user", "content": "Sum.\n\n1 2"}]
    assert load_examples(dolly, "dolly")[0].prompt == build_prompt("Sum.", "1 2")  # the paper's path unchanged
    prepared = _jsonl(tmp_path / "p.jsonl", [{"prompt": build_prompt("Q?"), "output": ["A"], "instruction": "Q?",
                                              "input": ""}])
    assert load_examples(prepared, "prompt_output", template="chat")[0].messages == [{"role": "user",
                                                                                     "content": "Q?"}]
    bare = _jsonl(tmp_path / "b.jsonl", [{"prompt": build_prompt("Q?"), "output": "A"}])
    with pytest.raises(DataError, match=r"b\.jsonl:1: prompt is Alpaca-templated but data\.template=chat"):
        load_examples(bare, "prompt_output", template="chat")


BAD = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "messages[0]: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]},
     "messages[0]: content must be a string, got list"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     "messages[1]: content must be a string, got NoneType"),
    ({"messages": "hi"}, "field 'messages' must be a list of messages, got str"),
    ({"messages": ["hi"]}, "messages[0] must be an object"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "no user turn before the response"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages[2] (user) comes after the last assistant turn"),
    ({"other": 1}, "missing field 'messages'"),
]


@pytest.mark.parametrize("row,message", BAD, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_messages_records_name_file_and_line(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [CHAT[1], row])
    with pytest.raises(DataError) as err:
        load_examples(path, "messages", template="chat")
    text = str(err.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text


@pytest.mark.parametrize("row,message", [
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     "no assistant turn at the end of 'completion'"),
    ({"prompt": [{"role": "user", "content": 3}], "completion": [{"role": "assistant", "content": "a"}]},
     "prompt[0]: content must be a string, got int"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "critic", "content": "a"}]},
     "completion[0]: unknown role 'critic'"),
    ({"prompt": [{"role": "user", "content": "q"}]}, "missing field 'completion'"),
])
def test_bad_prompt_completion_records(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match="^" + path.replace(".", r"\.") + ":1: .*" + message.replace("[", r"\[")
                       .replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        load_examples(path, "prompt_completion", template="chat")


def test_local_dataset_directory_goes_through_datasets_with_split_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = tmp_path / "chatset"
    (root / "chat").mkdir(parents=True)
    _jsonl(root / "chat" / "train_sft.jsonl", CHAT)
    _jsonl(root / "chat" / "test_sft.jsonl", CHAT[1:])
    (root / "README.md").write_text("---\nconfigs:\n- config_name: chat\n  data_files:\n"
                                    "  - split: train_sft\n    path: chat/train_sft.jsonl\n"
                                    "  - split: test_sft\n    path: chat/test_sft.jsonl\n---\n")
    train = load_examples(str(root), "messages", split="train_sft", template="chat", name="chat")
    test = load_examples(str(root), "messages", split="test_sft", template="chat", name="chat")
    assert [e.references for e in train] == [["10"], ["blue"]] and [e.id for e in test] == ["b"]
    with pytest.raises(DataError, match=r"chatset/chat\[nope\]:0: cannot load dataset"):
        load_examples(str(root), "messages", split="nope", template="chat", name="chat")
    bad = tmp_path / "badset"
    bad.mkdir()
    _jsonl(bad / "train.jsonl", CHAT[1:] + [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match=r"badset\[train\]:1: no assistant turn"):   # row 1 of the split
        load_examples(str(bad), "messages", template="chat")


# ----------------------------------------------------------------------------- templates and end of turn

@pytest.mark.parametrize("family,end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_chat_prompts_come_from_the_tokenizer_template_and_responses_end_on_end_of_turn(tmp_path, toks, family,
                                                                                          end):
    tok = toks[family]
    examples = load_examples(_jsonl(tmp_path / "c.jsonl", CHAT), "messages", template="chat")
    (first, second), dropped = tokenize_examples(examples, tok, 200, 300, Template("chat"))
    rendered = tok.apply_chat_template(examples[0].messages, tokenize=False, add_generation_prompt=True)
    assert dropped == 0 and first.prompt_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(first.response_ids[-1]) == end
    assert tok.decode(second.response_ids[:-1]) == "blue"
    if family == "llama3":   # one BOS, from the template: no second one added by the tokenizer
        assert first.prompt_ids.count(tok.bos_token_id) == 1 and first.prompt_ids[0] == tok.bos_token_id
        assert tok.eos_token_id != first.response_ids[-1]   # <|end_of_text|> is EOS; the turn ends on <|eot_id|>


def test_template_kwargs_reach_the_chat_template(toks):
    msgs = [{"role": "user", "content": "hi"}]
    off = render_prompt(toks["chatml"], msgs, {"enable_thinking": False})
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_prompt(toks["chatml"], msgs).endswith("<|im_start|>assistant\n")
    cfg = load_config(None, ["data.train_file=x.jsonl", "data.template=chat",
                             "data.template_kwargs.enable_thinking=false"])
    assert Template.of(cfg.data) == Template("chat", {"enable_thinking": False})


def test_chat_template_needs_one(toks):
    with pytest.raises(DataError, match="has no chat template"):
        end_of_turn_id(toks["plain"], Template("chat"))


def test_template_config_is_strict():
    base = ["data.train_file=x.jsonl"]
    with pytest.raises(ConfigError, match="data.template: must be one of alpaca, chat, none"):
        load_config(None, base + ["data.template=chatml"])
    with pytest.raises(ConfigError, match="data.template_kwargs: only used with data.template=chat"):
        load_config(None, base + ["data.template_kwargs.enable_thinking=false"])
    with pytest.raises(ConfigError, match="data.template_kwargs: expected dict"):
        load_config(None, base + ["data.template=chat", "data.template_kwargs=3"])
    with pytest.raises(ConfigError, match="data.format: must be one of"):
        load_config(None, base + ["data.format=sharegpt"])
    assert load_config(None, base).data.template == "alpaca"


def test_stop_ids_end_of_turn_first_then_generation_config_eos(toks):
    tok = toks["llama3"]
    gen = generation_eos_ids(tok, "llama3")
    stops = stop_ids(tok, Template("chat"), gen)
    names = tok.convert_ids_to_tokens(list(stops))
    assert names == ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]
    assert stop_ids(toks["plain"], Template(), toks["plain"].eos_token_id) == (toks["plain"].eos_token_id,)
    assert eos_for(toks["plain"]) == toks["plain"].eos_token_id   # single EOS stays a plain int


def test_strip_thinking():
    assert strip_thinking("<think>\nhmm, 2+3\n</think>\n\nIt is 5.") == "It is 5."
    assert strip_thinking("A <think>x</think>B <think>unfinished") == "A B"
    assert strip_thinking("plain answer ") == "plain answer"


# ----------------------------------------------------------------------------- decoding with several stop ids

def _scripted(tokens: list[list[int]], vocab: int):
    """A step function that emits ``tokens[row][t]`` at step t (one-hot logits)."""
    state = {"t": 0}

    def step(ids, mask, past):
        t = state["t"]
        state["t"] += 1
        logits = torch.full((len(tokens), vocab), -1e9)
        for row, seq in enumerate(tokens):
            logits[row, seq[min(t, len(seq) - 1)]] = 0.0
        return logits, None

    return step


def test_generate_stops_at_any_stop_id_and_forces_the_first():
    stops = (7, 3, 5)   # end-of-turn first
    script = [[1, 3, 2, 2], [1, 1, 5, 2], [2, 2, 2, 2]]
    ids = torch.ones(3, 2, dtype=torch.long)
    out = generate(_scripted(script, 10), ids, torch.ones_like(ids), SamplingParams(max_new_tokens=4, do_sample=False),
                   stops, pad_id=0, vocab_size=10)
    resp, mask = out.response_ids.tolist(), out.loss_mask[:, 2:].tolist()
    assert resp[0][:2] == [1, 3] and mask[0] == [1, 1, 0, 0]          # stopped on 3, mask through it
    assert resp[1][:3] == [1, 1, 5] and mask[1] == [1, 1, 1, 0]
    assert resp[2] == [2, 2, 2, 7] and mask[2] == [1, 1, 1, 1]        # unfinished: forced end-of-turn (7)
    single = generate(_scripted(script, 10), ids, torch.ones_like(ids),
                      SamplingParams(max_new_tokens=4, do_sample=False), 3, pad_id=0, vocab_size=10)
    assert single.response_ids.tolist()[1] == [1, 1, 5, 3]             # one id: 5 is no stop


def test_rollout_from_responses_cuts_at_the_first_stop_of_several():
    ids = torch.ones(3, 1, dtype=torch.long)
    out = rollout_from_responses(ids, torch.ones_like(ids), [[4, 5, 9, 6], [4, 4], [4, 4, 4, 4]], (9, 5), 0, 4)
    assert out.response_ids.tolist() == [[4, 5, 0, 0], [4, 4, 9, 0], [4, 4, 4, 9]]
    assert out.loss_mask[:, 1:].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


# ----------------------------------------------------------------------------- teacher tokenizer checks

def _data(template: str = "chat", teacher_template: str = "check"):
    return load_config(None, ["data.train_file=x.jsonl", f"data.template={template}",
                              f"data.teacher_template={teacher_template}"]).data


def test_teacher_tokenizer_must_render_chat_prompts_like_the_student(tmp_path, toks):
    examples = load_examples(_jsonl(tmp_path / "c.jsonl", CHAT), "messages", template="chat")
    same = toks["root"] / "chatml"
    check_teacher_tokenizer(str(same), _data(), toks["chatml"], examples)   # one family: fine
    other = tmp_path / "other"
    tok = load_tokenizer(str(same))
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>model")
    tok.save_pretrained(str(other))
    with pytest.raises(ConfigError, match="data.teacher_template: the teacher's chat template .* example 0"):
        check_teacher_tokenizer(str(other), _data(), toks["chatml"], examples)
    check_teacher_tokenizer(str(other), _data(teacher_template="student"), toks["chatml"], examples)
    with pytest.raises(ConfigError, match="model.teacher.path: the tokenizer in .* differs from the student's"):
        check_teacher_tokenizer(str(toks["root"] / "llama3"), _data(), toks["chatml"], examples)
    check_teacher_tokenizer("", _data(), toks["chatml"], examples)           # tiny teacher: nothing to compare
    bare = tmp_path / "bare"  # a model dir without tokenizer files (transformers 5 would build an empty tokenizer)
    bare.mkdir()
    (bare / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 500}')
    check_teacher_tokenizer(str(bare), _data(), toks["chatml"], examples)


# ----------------------------------------------------------------------------- soft prompt after BOS

def test_prompt_after_bos_reads_bos_then_prompt_then_the_rest_with_left_padding(tmp_path):
    from promptkd.models import PromptedTeacher, build_tiny
    from promptkd.models.teacher import TeacherSpec, load_teacher

    torch.manual_seed(0)
    base = build_tiny("llama3", 2, 32, 4, vocab_size=50, bos_token_id=1)
    teacher = PromptedTeacher(base, prompt_length=3, init="random", dtype=torch.float32, position="after_bos")
    rows = [[1, 7, 8, 9, 10], [1, 11, 12]]                      # BOS first in each row, left padded below
    ids = torch.tensor([rows[0], [0, 0] + rows[1]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    logits, _ = teacher(ids, mask)
    emb = base.get_input_embeddings()
    for r, row in enumerate(rows):                               # reference: one unpadded row, built by hand
        x = emb(torch.tensor([row]))
        seq = torch.cat([x[:, :1], teacher.prompt[None].float(), x[:, 1:]], dim=1)
        ref = base(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None]).logits[0, -(len(row) - 1):]
        torch.testing.assert_close(logits[r, -(len(row) - 1):], ref, atol=1e-5, rtol=1e-5)
    # decoding with the cache gives the full forward's last logits
    _, cache = teacher(ids[:, :-1], mask[:, :-1], use_cache=True)
    step, _ = teacher(ids[:, -1:], mask, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(step[:, -1], logits[:, -1], atol=1e-5, rtol=1e-5)
    start = PromptedTeacher(base, prompt_length=3, init="random", dtype=torch.float32)
    start.load_prompt_state(teacher.prompt_state())
    assert not torch.allclose(start(ids, mask)[0][0, -1], logits[0, -1], atol=1e-4)   # the position matters
    base.save_pretrained(str(tmp_path / "m"))
    teacher.save_prompt(str(tmp_path / "p"), "tiny")
    assert load_teacher(TeacherSpec.learned(str(tmp_path / "m"), torch.float32, str(tmp_path / "p"))).position \
        == "after_bos"


def test_prompt_after_bos_needs_a_bos_token():
    with pytest.raises(ConfigError, match="model.teacher.prompt_position: must be one of start, after_bos"):
        load_config(None, ["data.train_file=x.jsonl", "model.teacher.prompt_position=after_system"])


def test_a_trained_tokenizer_can_carry_a_family_chat_template(tmp_path):
    from promptkd.training.builders import build_tokenizer

    cfg = load_config(None, ["data.train_file=x.jsonl", "tokenizer.train=true", "tokenizer.vocab_size=400",
                             "tokenizer.chat=llama3", "data.template=chat"])
    tok = build_tokenizer(cfg, str(tmp_path), TEXTS)
    assert tok.bos_token == "<|begin_of_text|>" and end_of_turn_id(tok, Template("chat")) == \
        tok.convert_tokens_to_ids("<|eot_id|>")
    with pytest.raises(ConfigError, match="tokenizer.chat: must be one of"):
        load_config(None, ["data.train_file=x.jsonl", "tokenizer.chat=gemma"])


def test_attn_implementation_reaches_transformers(monkeypatch, tmp_path):
    import importlib.util

    from promptkd.models import build_tiny, load_pretrained
    from promptkd.models.loading import attn_kwargs

    model = build_tiny("qwen3", 1, 32, 4, vocab_size=64, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    model.save_pretrained(str(tmp_path))
    assert load_pretrained(str(tmp_path), torch.float32, attn_implementation="sdpa").config._attn_implementation == "sdpa"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ConfigError, match="model.student.attn_implementation: flash_attention_2 needs the flash-attn"):
        attn_kwargs("flash_attention_2", "model.student.attn_implementation")
    assert attn_kwargs("") == {}
