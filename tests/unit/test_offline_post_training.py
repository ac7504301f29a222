"""The pieces of `areal-py sft` and `areal-py rm` without a run: supervised records, the SFT loss against Hugging
Face's own masked loss, the reward model's pair statistics by hand, the data split, and the offline report."""
from __future__ import annotations

import json
import math

import pytest
import torch

from areal_py.config import load_config
from areal_py.models import EmbeddedModelSpec, create_embedded_model, eos_token_id, load_model_and_tokenizer
from areal_py.tasks.arith import ArithTask
from areal_py.tasks.base import ChatMessage
from areal_py.tasks.jsonl import JsonlTask
from areal_py.tasks.sft_records import SftExample, read_examples, synthetic_examples, write_examples
from areal_py.telemetry.offline_report import render_offline_html, summary_rows
from trainer.offline import load_split
from trainer.rm import PairStats
from trainer.sft import heldout_loss, response_tokens, tokenize_examples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The embedded model's shape (character tokenizer, chat template), random weights."""
    torch.manual_seed(0)
    return load_model_and_tokenizer(create_embedded_model(tmp_path_factory.mktemp("emb"), EmbeddedModelSpec()))


def test_records_round_trip_and_synthetic(tmp_path):
    ex = [SftExample("1+2=", "3"),
          SftExample("be brief\n\n2+2?", "4", (ChatMessage("system", "be brief"), ChatMessage("user", "2+2?")))]
    path = write_examples(tmp_path / "s.jsonl", ex)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == {"prompt": "1+2=", "response": "3"}
    assert lines[1]["messages"][-1] == {"role": "assistant", "content": "4"}
    assert read_examples(path) == ex
    task = ArithTask(seed=0)
    a, b = task.operands(3)
    assert synthetic_examples(task, 3, 1) == [SftExample(f"{a}+{b}=", str(a + b))]


def test_bad_records_are_all_named(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"prompt": "a", "response": "1"}\n'
                 '{"prompt": "a"}\n'
                 '{"messages": [{"role": "user", "content": "x"}]}\n'
                 '{"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
                 '{"prompt": "a", "response": ""}\n'
                 '{"prompt": "a", "response": "1", "answer": "1"}\n')
    with pytest.raises(ValueError) as e:
        read_examples(f)
    msg = str(e.value)
    assert "5 bad line(s) of 6 non-empty" in msg
    for want in (":2: missing key 'response'", ":3: 'messages' must be a list ending with the assistant's",
                 ":4: 'messages': the last message must be the user's", ":5: 'response': the response must be",
                 ":6: unexpected key 'answer'"):
        assert want in msg
    with pytest.raises(ValueError, match="no synthetic supervised examples"):
        q = tmp_path / "q.jsonl"
        q.write_text('{"prompt": "q", "answer": "1"}\n')
        synthetic_examples(JsonlTask(str(q)), 0, 1)


def test_chat_record_trains_only_the_assistant_turn(tiny):
    _, tok = tiny
    cfg = load_config(None, ["task.chat_template=true"])
    ex = SftExample("hi\n\n1+1", "2", (ChatMessage("user", "hi"), ChatMessage("assistant", "ok"),
                                      ChatMessage("user", "1+1")))
    (row,) = tokenize_examples(tok, [ex], cfg, None, "training")
    # by the embedded template: <bos><user>hi</user><assistant>ok</assistant><user>1+1</user><assistant>, then 2, EOS
    prompt = tok.decode(row.ids[1:row.prompt_len])
    assert prompt == "<user>hi</user><assistant>ok</assistant><user>1+1</user><assistant>"
    assert row.ids[row.prompt_len:] == tok("2", add_special_tokens=False).input_ids + [eos_token_id(tok)]
    with pytest.raises(ValueError, match="longer than the model's context of 5 tokens"):
        tokenize_examples(tok, [ex], cfg, 5, "training")


@pytest.mark.parametrize("budget", [0, 24])
def test_sft_loss_is_hf_masked_token_mean_whatever_the_packing(tiny, budget):
    model, tok = tiny
    cfg = load_config(None, [])
    ex = [SftExample("3+4=", "7"), SftExample("12+30=", "42"), SftExample("1+1=", "2"), SftExample("9+9=", "18")]
    rows = tokenize_examples(tok, ex, cfg, None, "held-out")
    assert response_tokens(rows) == 2 + 3 + 2 + 3  # the answer's characters and EOS
    # Hugging Face's own loss: labels -100 on the prompt and the padding, mean over every other label of the batch
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        ids[i, :len(r.ids)] = torch.tensor(r.ids)
        labels[i, r.prompt_len:len(r.ids)] = torch.tensor(r.ids[r.prompt_len:])
    with torch.no_grad():
        attention = (torch.arange(width)[None, :] < torch.tensor([len(r.ids) for r in rows])[:, None]).long()
        expected = model(input_ids=ids, attention_mask=attention, labels=labels).loss.item()
    assert heldout_loss(model, rows, tok.pad_token_id, budget) == pytest.approx(expected, rel=1e-5)


def test_pair_stats_by_hand():
    s = PairStats.of(torch.tensor([3.0, -1.0]), torch.tensor([1.0, -1.0])).means()
    # margins 2 and 0: loss mean(log(1 + e^-2), log 2); the tie counts as wrong
    assert s["loss"] == pytest.approx((math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2, abs=1e-9)
    assert s["accuracy"] == 0.5 and s["margin"] == 1.0
    assert s["reward_chosen"] == 1.0 and s["reward_rejected"] == 0.0
    both = PairStats.of(torch.tensor([3.0]), torch.tensor([1.0])) + PairStats.of(torch.tensor([-1.0]),
                                                                                 torch.tensor([-1.0]))
    assert both.means() == pytest.approx(s)


def test_split_of_a_file_is_seeded_and_disjoint(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{i}+0=", "response": str(i)}) + "\n" for i in range(10)))
    cfg = load_config(None, [f"sft.train_path={f}", "sft.eval_examples=3"])
    train, held = load_split(cfg.sft, "sft", None, 0, synthetic_examples, read_examples)
    assert len(train) == 7 and len(held) == 3 and not set(train) & set(held)
    assert (train, held) == load_split(cfg.sft, "sft", None, 0, synthetic_examples, read_examples)
    assert [int(e.response) for e in train] == sorted(int(e.response) for e in train)  # file order kept
    cfg = load_config(None, [f"sft.train_path={f}", "sft.eval_examples=10"])
    with pytest.raises(ValueError, match="sft.eval_examples=10 holds out every one of the 10 records"):
        load_split(cfg.sft, "sft", None, 0, synthetic_examples, read_examples)
    with pytest.raises(ValueError, match="set rm.train_path"):
        load_split(load_config(None, []).rm, "rm", None, 0, synthetic_examples, read_examples)


def test_offline_report_numbers():
    records = [{"kind": "eval", "step": 0, "epoch": 0, "eval_loss": 0.5, "wall_time_s": 1.0},
               {"kind": "train", "step": 1, "epoch": 1, "loss": 0.9, "grad_norm": 1.0, "wall_time_s": 2.0},
               {"kind": "train", "step": 2, "epoch": 1, "loss": 0.7, "grad_norm": 1.0, "wall_time_s": 3.0},
               {"kind": "eval", "step": 2, "epoch": 1, "eval_loss": 0.25, "wall_time_s": 4.0}]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert summary_rows(train, evals) == [("optimiser steps", "2"), ("epochs evaluated", "1"), ("wall time", "3 s"),
                                          ("held-out eval_loss", "0.5 (step 0) -> 0.25 (step 2)")]
    page = render_offline_html("r", "sft", records, [("sft.lr", "0.0001")])
    assert 'data-chart="train-loss"' in page and 'data-chart="eval-eval_loss"' in page
    assert 'data-series="loss" data-x="2" data-y="0.7"' in page and "sft.lr" in page
    assert 'id="no-steps"' in render_offline_html("r", "rm", [], None)


def test_rm_keys_and_their_defaults():
    cfg = load_config(None, ["rm.max_length=64"])
    assert cfg.rm.max_length == 64 and cfg.rm.lr == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="eval_samples"):
        load_config(None, ["rm.eval_samples=4"])  # nothing is sampled from a reward model
