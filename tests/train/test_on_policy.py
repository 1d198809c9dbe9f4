"""On-policy distillation, sequence-level KD and the generation metrics (tune_kd/on_policy.py)."""

import json
import math

import numpy as np
import pytest
import torch

from tune_kd.data import tokenized
from tune_kd.teacher import local
from tune_kd.train import loop, on_policy
from tune_kd.train.loop import train
from tune_kd.train.run import build_run
from tune_kd.train.step import MicroStep, backward_step

from conftest import step_run


def run_parts(cfg):
    """(tokenizer, train split, val split, student ScoredLM, teacher ScoredLM, precision, pad id) of
    cfg's run as train/run.build_run builds it, without its teacher cache."""
    run = build_run(cfg, cache=False)
    return run.tokenizer, run.train_data, run.val_data, run.student, run.teacher.scored, run.precision, run.pad_id


def test_fraction_zero_never_generates_and_generation_metrics_leave_training_alone(tiny_config, monkeypatch):
    """on_policy_fraction 0 is today's run: no batch is generated, and the per-epoch val_gen_*
    evaluation (which samples in a forked RNG) leaves the trained weights bit for bit the same."""
    calls = []
    original = on_policy.Generation.on_policy_batch
    monkeypatch.setattr(on_policy.Generation, "on_policy_batch", lambda *a, **k: calls.append(1) or original(*a, **k))
    plain = train(tiny_config(train={"epochs": 2, "on_policy_fraction": 0.0}))
    measured = train(tiny_config(train={"epochs": 2, "on_policy_fraction": 0.0}, eval={"generation_samples": 16}))
    assert calls == []
    for a, b in zip(plain.student.parameters(), measured.student.parameters()):
        assert torch.equal(a, b)
    assert math.isnan(plain.metrics["val_gen_acc"]) and math.isnan(plain.metrics["val_gen_ce"])
    assert 0.0 <= measured.metrics["val_gen_acc"] <= 1.0 and measured.metrics["val_gen_ce"] > 0


def test_the_on_policy_share_is_a_pure_draw_at_the_asked_rate():
    draws = [on_policy.is_on_policy(0.3, 0, epoch, micro) for epoch in range(4) for micro in range(500)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    assert draws == [on_policy.is_on_policy(0.3, 0, e, m) for e in range(4) for m in range(500)]   # resume agrees
    assert not any(on_policy.is_on_policy(0.0, 0, 0, m) for m in range(100))
    assert all(on_policy.is_on_policy(1.0, 0, 0, m) for m in range(100))


def test_the_warm_up_keeps_the_first_share_of_training_off_policy():
    assert not on_policy.on_policy_started(49, 100, 0.5) and on_policy.on_policy_started(50, 100, 0.5)
    assert on_policy.on_policy_started(0, 100, 0.0)
    assert not any(on_policy.is_on_policy(1.0, 0, 0, m, warmed_up=False) for m in range(100))


def test_on_policy_start_trains_off_policy_then_on_policy_reading_the_cache_until_then(tiny_config, monkeypatch):
    """on_policy_fraction 1 with on_policy_start 0.5 over 2 epochs: the first epoch is the data's
    replies only (read from the teacher cache), the second the student's own; searchable."""
    from tune_kd.config.checks import SEARCHABLE
    from tune_kd.teacher import cache_store

    read = []
    original_rows = cache_store.TeacherCache.rows
    monkeypatch.setattr(cache_store.TeacherCache, "rows", lambda self, idx: read.append(len(idx)) or original_rows(self, idx))
    kinds = []
    original_step = loop.backward_step
    monkeypatch.setattr(loop, "backward_step", lambda *a, **k: kinds.append(a[2].on_policy) or original_step(*a, **k))
    result = train(tiny_config(train={"epochs": 2, "on_policy_fraction": 1.0, "on_policy_start": 0.5, "max_new_tokens": 8},
                               teacher_cache={"mode": "on", "top_k": 16}))
    first, second = kinds[:len(kinds) // 2], kinds[len(kinds) // 2:]
    assert first and not any(first) and all(second)
    assert len(read) == len(first)
    assert math.isnan(result.history[0]["on_policy_s_per_batch"]) and math.isnan(result.history[1]["off_policy_s_per_batch"])
    assert "on_policy_start" in SEARCHABLE


def test_on_policy_start_must_leave_some_training(tiny_config):
    from tune_kd.config.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.on_policy_start: must be in \[0, 1\)"):
        tiny_config(train={"on_policy_start": 1.0})


def test_generation_stops_at_the_end_of_turn_and_renders_like_the_template(tiny_config, world):
    """The teacher's greedy replies to validation prompts: each ends at its first <|im_end|>, and the
    prompt + reply is exactly the ids the chat template renders for that conversation."""
    cfg = tiny_config(train={"max_new_tokens": 24})
    tokenizer, _, val_data, _, teacher, _, pad = run_parts(cfg)
    generation = on_policy.Generation(cfg, tokenizer, pad, [teacher.lm], "test")
    assert generation.end_of_turn == tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversations = [json.loads(line)["conversations"] for line in open(world["val"])]
    single = [i for i, c in enumerate(conversations) if [t["role"] for t in c] == ["user", "assistant"]][:12]
    prompts, _ = on_policy.prompts_and_replies(val_data, single)
    replies = generation.answer(teacher.lm, prompts, temperature=0.0)
    ended = 0
    for index, prompt, reply in zip(single, prompts, replies):
        assert (reply == generation.end_of_turn).sum() <= 1
        if len(reply) and reply[-1] == generation.end_of_turn:
            ended += 1
            text = tokenizer.decode(reply[:-1], skip_special_tokens=False)
            turns = conversations[index][:-1] + [{"role": "assistant", "content": text}]
            rendered = tokenizer.apply_chat_template(turns, tokenize=False).rstrip("\n")   # after <|im_end|>: layout
            assert tokenizer.encode(rendered, add_special_tokens=False) == [*prompt.tolist(), *reply.tolist()]
        else:
            assert len(reply) == 24   # no end-of-turn: it ran out of new tokens
    assert ended >= 10   # the trained teacher closes its turns


def test_a_sampled_batch_is_the_one_seed_gives_and_left_padding_changes_no_reply(tiny_config):
    cfg = tiny_config(train={"max_new_tokens": 12})
    tokenizer, _, val_data, student, _, _, pad = run_parts(cfg)
    generation = on_policy.Generation(cfg, tokenizer, pad, [student.lm], "test")
    prompts, _ = on_policy.prompts_and_replies(val_data, range(8))
    first = generation.answer(student.lm, prompts, 1.0, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(first, generation.answer(student.lm, prompts, 1.0, seed=5)))
    assert any(not np.array_equal(a, b) for a, b in zip(first, generation.answer(student.lm, prompts, 1.0, seed=6)))
    batched = generation.answer(student.lm, prompts, 0.0)
    alone = [generation.answer(student.lm, [p], 0.0)[0] for p in prompts]
    assert all(np.array_equal(a, b) for a, b in zip(batched, alone))


def test_at_fraction_one_the_loss_is_the_divergence_on_generated_positions_only(tiny_config):
    """backward_step on an on-policy batch: only the reply positions are scored, and the student's
    gradient equals T^2 * KL(teacher || student) at T, summed over exactly those positions and
    divided by the normalizer, computed here from the full logits without the loop's code."""
    cfg = tiny_config(train={"on_policy_fraction": 1.0, "temperature": 2.0, "max_new_tokens": 10})
    tokenizer, train_data, _, student, teacher, precision, pad = run_parts(cfg)
    generation = on_policy.Generation(cfg, tokenizer, pad, [student.lm, teacher.lm], "test")
    indices = np.arange(6)
    batch, scored = generation.on_policy_batch(student.lm, train_data, indices, seed=3, autocast=precision.autocast)
    prompts, _ = on_policy.prompts_and_replies(train_data, indices)
    replies = generation.answer(student.lm, prompts, cfg.train.generation_temperature, seed=3)   # the same draw
    labelled = batch["labels"] != tokenized.IGNORE_INDEX
    for row, (prompt, reply) in enumerate(zip(prompts, replies)):   # labels on the generated reply, nowhere else
        assert torch.equal(batch["input_ids"][row, :len(prompt)], torch.from_numpy(prompt))
        assert torch.equal(batch["labels"][row, len(prompt):len(prompt) + len(reply)], torch.from_numpy(reply))
        assert int(labelled[row].sum()) == len(reply)
    assert scored == int(labelled.sum()) > 0

    student.zero_grad()
    backward_step(step_run(cfg, student, teacher, precision), batch, MicroStep(7.0, cfg.train.temperature, on_policy=True))
    got = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()
    ids = batch["input_ids"]
    predicts = torch.zeros_like(labelled)
    predicts[:, :-1] = labelled[:, 1:]          # the logit at t predicts token t + 1
    s = student.lm(input_ids=ids).logits[predicts] / 2.0
    with torch.no_grad():
        t = teacher.lm(input_ids=ids).logits[predicts] / 2.0
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum()
    (4.0 * kl / 7.0).backward()
    for a, b in zip(got, (p.grad for p in student.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_val_gen_acc_is_the_hand_count_of_exact_replies(tiny_config):
    cfg = tiny_config(train={"max_new_tokens": 16}, eval={"generation_samples": 10})
    tokenizer, _, val_data, _, teacher, precision, pad = run_parts(cfg)
    generation = on_policy.Generation(cfg, tokenizer, pad, [teacher.lm], "test")
    subset = on_policy.generation_subset(val_data, 10)
    assert len(subset) == 10 and np.array_equal(subset, on_policy.generation_subset(val_data, 10))
    sums = on_policy.generation_sums(teacher.lm, generation, val_data, subset, 4, None, precision.autocast, "cpu")
    # by hand: one prompt at a time through Hugging Face's generate, compared as text
    right = 0
    for i in subset:
        tokens, mask = val_data.example(int(i))
        prompt, reference = on_policy.split_last_reply(tokens, mask)
        out = teacher.lm.generate(torch.as_tensor(prompt)[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  do_sample=False, max_new_tokens=16, eos_token_id=generation.end_of_turn, pad_token_id=pad)
        right += tokenizer.decode(out[0, len(prompt):]) == tokenizer.decode(reference)
    metrics = on_policy.generation_metrics(sums, has_teacher=False)
    assert metrics["val_gen_acc"] == right / 10
    assert math.isnan(metrics["val_gen_ce"])

    # and with replies set by hand: 3 of 4 exact, one a token short of its end-of-turn
    references = [on_policy.split_last_reply(*val_data.example(int(i)))[1] for i in subset[:4]]
    generation.answer = lambda lm, prompts, temperature, seed=0, autocast=None: \
        [*references[:3], references[3][:-1]][:len(prompts)]
    sums = on_policy.generation_sums(teacher.lm, generation, val_data, subset[:4], 4, None, precision.autocast, "cpu")
    assert on_policy.generation_metrics(sums, False)["val_gen_acc"] == 0.75


def test_the_teacher_cache_serves_off_policy_batches_only(tiny_config, monkeypatch):
    from tune_kd.teacher import cache_store

    cfg = tiny_config(train={"epochs": 1, "on_policy_fraction": 0.5, "max_new_tokens": 12},
                      teacher_cache={"mode": "on", "top_k": 16})
    served, live = [], []
    original_rows = cache_store.TeacherCache.rows
    monkeypatch.setattr(cache_store.TeacherCache, "rows", lambda self, idx: served.append(len(idx)) or original_rows(self, idx))
    original_forward = local.teacher_forward
    monkeypatch.setattr(local, "teacher_forward", lambda *a: live.append(torch.is_grad_enabled()) or original_forward(*a))
    kinds = []
    original_step = loop.backward_step
    monkeypatch.setattr(loop, "backward_step", lambda *a, **k: kinds.append(a[2].on_policy) or original_step(*a, **k))
    result = train(cfg)
    on, off = sum(kinds), len(kinds) - sum(kinds)
    assert on > 5 and off > 5
    assert len(served) == off                      # every off-policy batch read the cache
    assert sum(live) == on                         # every on-policy batch ran the live teacher (training: grad on)
    assert result.metrics["on_policy_s_per_batch"] > 0 and result.metrics["off_policy_s_per_batch"] > 0


def test_seq_kd_trains_on_the_teachers_replies_generated_once(tiny_config, monkeypatch):
    cfg = tiny_config(train={"epochs": 2, "seq_kd": True, "max_new_tokens": 12})
    asked = []
    original = on_policy.Generation.answer
    monkeypatch.setattr(on_policy.Generation, "answer",
                        lambda self, lm, prompts, *a, **k: asked.append(len(prompts)) or original(self, lm, prompts, *a, **k))
    train(cfg)
    assert sum(asked) == 1200   # every training example once, in epoch 1; epoch 2 reuses them


def test_an_on_policy_best_gets_an_off_policy_arm_and_a_verdict(tiny_config):
    from tune_kd.results import arms
    from tune_kd.search import controls

    cfg = tiny_config(parameters={"on_policy_fraction": {"distribution": "uniform", "min": 0.0, "max": 1.0},
                                  "alpha": {"distribution": "uniform", "min": 0.0, "max": 1.0}})
    points = controls.arm_points(cfg, {"on_policy_fraction": 0.6, "alpha": 0.3})
    assert points["plain_sft"] == {"on_policy_fraction": 0.0, "alpha": 1.0}      # no teacher: nothing on-policy
    assert points["best_off_policy"] == {"on_policy_fraction": 0.0, "alpha": 0.3}
    assert "best_off_policy" not in controls.arm_points(cfg, {"on_policy_fraction": 0.0, "alpha": 0.3})

    results = {"best_off_policy": {"value": 0.40, "metrics": {"val_gen_acc": 0.40}},
               "plain_sft": {"value": 0.30, "metrics": {"val_gen_acc": 0.30}}}
    line = arms.on_policy_verdict("val_gen_acc", "max", 0.45, results)
    assert line.startswith("did on-policy help? yes: val_gen_acc 0.4500 (the best trial) vs 0.4000") and "+0.0500" in line
    line = arms.on_policy_verdict("val_ce", "min", 1.2, {**results, "best_off_policy": {
        "value": 1.1, "metrics": {"val_gen_acc": 0.4}}})
    assert line.startswith("did on-policy help? no") and "best_off_policy 0.400, plain_sft 0.300" in line
    assert arms.on_policy_verdict("val_ce", "min", 1.2, {"plain_sft": results["plain_sft"]}) is None


def test_an_off_policy_best_says_how_far_the_best_on_policy_trial_fell_short(tmp_path):
    from tune_kd.results import arms

    for trial, fraction, values in (("a", 0.0, [0.02, 0.08]), ("b", 0.6, [0.0, 0.005]), ("c", 0.9, [0.0])):
        folder = tmp_path / f"trial_{trial}"
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps({"on_policy_fraction": fraction}))
        (folder / "result.json").write_text("".join(json.dumps({"epoch": e + 1, "val_gen_acc": v}) + "\n"
                                                    for e, v in enumerate(values)))
    line = arms.off_policy_best_verdict("val_gen_acc", "max", 0.08, tmp_path)
    assert line == ("did on-policy help? no: the best trial trained off-policy (on_policy_fraction 0, val_gen_acc "
                    "0.0800); the best on-policy trial (on_policy_fraction 0.60, 2 epoch(s)) reached 0.0050 = -0.0750")
