"""teacher_server auto decides by cost (teacher/served.py's decide and estimate, search/teacher_choice.py's
measurement), rows are never a top-k bigger than the full row (stored_rows.layout), and the served
teacher batches trials that take turns (search/teacher_actor.py's gather)."""

import asyncio
import concurrent.futures
import time
import types

import numpy as np
import pytest

from tune_kd.search import teacher_actor, teacher_choice
from tune_kd.teacher import served
from tune_kd.teacher.served import TeacherCosts
from tune_kd.teacher.stored_rows import layout

QWEN_IDS = 151_646


def test_rows_are_never_a_top_k_bigger_than_the_full_row():
    """At Qwen2.5's vocabulary top-131,072 in float16 (values, uint32 ids, tail) would be 786,450 bytes
    a position against the full float32 row's 606,584: the full row is kept instead."""
    full = layout(131_072, QWEN_IDS)
    assert full.full and full.k == QWEN_IDS and full.bytes_per_position == 4 * QWEN_IDS
    kept = layout(65_536, QWEN_IDS)
    assert not kept.full and kept.bytes_per_position == 65_536 * 6 + 9 * 2 < full.bytes_per_position
    # the switch is where the top k's bytes reach the full row's, for every dtype
    for dtype in ("float16", "bfloat16", "float32"):
        below = next(k for k in range(QWEN_IDS, 0, -1) if not layout(k, QWEN_IDS, dtype).full)
        assert layout(below, QWEN_IDS, dtype).bytes_per_position < 4 * QWEN_IDS
        assert layout(below + 1, QWEN_IDS, dtype).full


def cpu_costs(**changes) -> TeacherCosts:
    """A 2-core CPU node's shape: the server's answer costs more than a trial's own forward (rows to
    compress and copy) and two batches in one forward cost two."""
    base = dict(local_forward_s=1.0, served_one_s=1.5, served_pair_s=3.0, student_s=3.0, positions=900,
                rows_bytes=900 * 606_584, teacher_bytes=100_000_000, memory_bytes=20_000_000_000, device="cpu")
    return TeacherCosts(**{**base, **changes})


def test_auto_keeps_a_teacher_per_trial_where_serving_is_slower_and_names_the_costs(tiny_config):
    cfg = tiny_config()
    serve, why = served.decide(cfg, 2, cache_used=False, costs=cpu_costs(), served_trials=2, shared_compute=True)
    assert not serve
    assert why.startswith("auto: not used, a teacher in each trial is faster")
    # local: 2 / (3 + 1) = 0.5 steps/s; served: a step is max(3 + 3 / 2, 3) = 4.5 s -> 2 / 4.5 = 0.444
    assert "estimated 0.5 trial-steps/s with a teacher in each of 2 trials" in why
    assert "against 0.444 served to 2" in why and "0.55 GB of rows for 900 positions" in why
    est = served.estimate(cpu_costs(), 2, 2, shared_compute=True)
    assert est.local == pytest.approx(0.5) and est.served == pytest.approx(2 / 4.5)


def test_auto_serves_where_one_teacher_is_faster_or_the_copies_do_not_fit(tiny_config):
    cfg = tiny_config()
    # a GPU of its own for the server, where batching two requests costs little more than one
    gpu = cpu_costs(local_forward_s=0.2, served_one_s=0.25, served_pair_s=0.27, student_s=0.3, device="cuda")
    serve, why = served.decide(cfg, 2, cache_used=False, costs=gpu, served_trials=2, shared_compute=False)
    assert serve and why.startswith("auto: served, one teacher for 2 trials is faster")
    # four copies of a 6 GB teacher in 16 GB: serve whatever the speed
    big = cpu_costs(teacher_bytes=6_000_000_000, memory_bytes=16_000_000_000)
    serve, why = served.decide(cfg, 4, cache_used=False, costs=big, served_trials=4, shared_compute=True)
    assert serve and "4 teacher copies (24.00 GB) would take more than 50% of the node's 16.00 GB" in why
    # the config's own answers come before any cost
    assert not served.decide(tiny_config(teacher_server="off"), 4, cache_used=False, costs=big)[0]
    assert not served.decide(cfg, 4, cache_used=True, costs=big)[0]          # the cache answers the batches


def test_the_server_waits_for_other_trials_only_where_batching_pays():
    assert teacher_actor.batching_wait(None) == 0.0
    assert teacher_actor.batching_wait(cpu_costs()) == 0.0                   # CPU: a pair costs two
    gpu = cpu_costs(served_one_s=0.25, served_pair_s=0.27)
    assert teacher_actor.batching_wait(gpu) == 0.25                           # up to one request's answer


def bare_server(wait_for_trials_s: float, forward_s: float):
    """A TeacherServer without Ray or a model: its queue and gather, and a forward that takes forward_s."""
    server = teacher_actor.TeacherServer.__new__(teacher_actor.TeacherServer)
    server.settings = types.SimpleNamespace(max_wait_ms=10.0, max_batch_tokens=65536)
    server.pending, server.arrival, server.batcher = [], None, None
    server.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    server.forwards = server.requests = 0
    server.busy_s = 0.0
    server.wait_for_trials_s, server.asked = wait_for_trials_s, {}

    def forward(batch):
        time.sleep(forward_s)
        return [{"values": np.zeros(1)} for _ in batch]
    server._forward = forward
    return server


def take_turns(server, steps: int, student_s: float, offset_s: float) -> dict:
    """Two trials, the second starting offset_s later, each asking, then working student_s, `steps` times."""
    ids, positions = np.zeros((2, 4), dtype=np.int64), np.ones((2, 4), dtype=bool)

    async def trial(name, delay):
        await asyncio.sleep(delay)
        for _ in range(steps):
            await server.score(ids, positions, name)
            await asyncio.sleep(student_s)

    async def both():
        await asyncio.gather(trial("a", 0.0), trial("b", offset_s))
    asyncio.run(both())
    return server.stats()


def test_trials_that_take_turns_are_batched_where_batching_pays():
    """Two trials out of phase with a busy server: each forward finds exactly one request queued
    (the other trial is waiting for its answer), so they take turns, one request per forward;
    waiting for the asking trials puts both in one forward."""
    turns = take_turns(bare_server(0.0, forward_s=0.2), steps=6, student_s=0.05, offset_s=0.1)
    assert turns["requests"] == 12 and turns["forwards"] >= 10                 # ~1.0 requests per forward
    batched = take_turns(bare_server(1.0, forward_s=0.2), steps=6, student_s=0.05, offset_s=0.1)
    assert batched["requests"] == 12 and batched["forwards"] <= 8             # ~2 requests per forward


def test_the_costs_are_measured_on_a_real_run(tiny_config):
    """teacher_choice.measure on the tiny world: every time positive, the rows' bytes the layout's
    bytes per position times the batch's scored positions, the teacher's weights counted."""
    from tune_kd.search.prepare import driver_config
    from tune_kd.train.run import build_run

    cfg = tiny_config()
    run = build_run(driver_config(cfg), cache=False)
    lay = layout(8, len(run.tokenizer))
    costs = teacher_choice.measure(run, lay)
    assert min(costs.local_forward_s, costs.served_one_s, costs.served_pair_s, costs.student_s) > 0
    batch = teacher_choice.representative_batch(run)
    assert costs.positions == int((batch["labels"][:, 1:] != -100).sum()) > 0
    assert costs.rows_bytes == costs.positions * lay.bytes_per_position
    assert costs.teacher_bytes == sum(p.numel() * 4 for p in run.teacher.lm.parameters())
    assert costs.memory_bytes > 0 and costs.device == "cpu"


TEACHER_ROWS = 151_936      # Qwen2.5's embedding rows (its tokenizer has 151,646 ids)


@pytest.fixture(scope="module")
def flat_vocab_world(tmp_path_factory) -> dict:
    """A 151,646-id tokenizer (the demo's characters, the rest ids no text spells), the demo's chats,
    and an untrained Qwen2 teacher with 151,936 rows: a flat teacher at Qwen2.5's vocabulary, the
    case where top_k auto asks for a k so large that its rows outgrow the full row."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from tune_kd.search import demo

    root = tmp_path_factory.mktemp("flat-vocab")
    spelled = demo.SPECIAL_TOKENS + sorted(set(__import__("string").printable) - set("\t\r\x0b\x0c"))
    unused = QWEN_IDS - len(spelled) - len(demo.ROLE_TOKENS)
    vocab = {token: i for i, token in enumerate(spelled + [f"<unused_{i}>" for i in range(unused)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(demo.SPECIAL_TOKENS)
    core.add_tokens(demo.ROLE_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.chat_template = demo.CHAT_TEMPLATE
    assert len(tokenizer) == QWEN_IDS
    tokenizer.save_pretrained(str(root / "tokenizer"))
    teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=TEACHER_ROWS, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                           max_position_embeddings=128, tie_word_embeddings=True))
    teacher.save_pretrained(str(root / "teacher"))
    tokenizer.save_pretrained(str(root / "teacher"))
    demo.write_jsonl(root / "train.jsonl", demo.make_conversations(48, seed=5))
    demo.write_jsonl(root / "val.jsonl", demo.make_conversations(12, seed=6))
    return {"root": root, "tokenizer": str(root / "tokenizer"), "train": str(root / "train.jsonl"),
            "val": str(root / "val.jsonl"), "cache": str(root / "cache"), "teacher": str(root / "teacher")}


def flat_raw(world, **sections):
    """The search on the flat world: top_k as top_k auto picks for such a teacher (top-131,072, fixed here:
    auto's measurement at 152k ids takes minutes), the teacher cache declined (max_gb), 2 trials at a time."""
    from conftest import search_raw

    raw = search_raw(world, num_samples=2, train={"epochs": 1, "batch_size": 16},
                     teacher_cache={"top_k": 131_072, "max_gb": 0.001}, data={"max_seq_len": 96})
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def test_a_flat_teacher_at_qwen_vocabulary_gets_full_rows_and_a_teacher_per_trial(flat_vocab_world, caplog):
    """Where the cache is declined, the rows a server would send are the full row, never top-131,072
    (786,450 bytes a position), and teacher_server auto prices serving against a teacher per trial
    on this CPU node: serving is slower (one queue on the trials' own cores), so each trial holds its
    teacher; the choice's line gives both estimates."""
    from tune_kd.config.experiment import load_config
    from tune_kd.search import runner
    from tune_kd.search.prepare import prepare_teacher_rows

    cfg = load_config(raw=flat_raw(flat_vocab_world))
    rows = prepare_teacher_rows(cfg, serve=True)
    assert rows.cache is None and "above teacher_cache.max_gb" in rows.why
    assert rows.served_layout.full and rows.served_layout.bytes_per_position == 4 * QWEN_IDS
    assert rows.costs.rows_bytes == rows.costs.positions * 4 * QWEN_IDS
    node = {"NodeID": "node-1", "Alive": True, "Resources": {"CPU": 2.0}}
    placed = {"teacher_cache": None, "served_layout": rows.served_layout, "teacher_costs": rows.costs}
    with caplog.at_level("INFO", logger="tune_kd.search.runner"):
        resolved, actors, parallel = runner.serve_teacher(cfg, placed, {"cpu": 1, "gpu": 0, "workers": 1}, 2,
                                                         {"CPU": 2.0}, [node])
    assert resolved.teacher_server.mode == "off" and actors is None and parallel == 2
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher server:"))
    assert "auto: not used, a teacher in each trial is faster" in line
    assert "trial-steps/s with a teacher in each of 2 trials" in line and "served to 2" in line


def test_a_search_that_never_serves_is_not_sized_for_a_server(tiny_config):
    """What a server would take from the trials is worked out only where one may serve: a data-parallel
    trial that needs 2.01 CPUs fits a 3-CPU Ray, but not the 2 left once a server's CPU is taken out;
    with teacher_server off that must not matter."""
    from tune_kd.config.errors import UserError
    from tune_kd.search import runner

    node = {"NodeID": "node-1", "Alive": True, "Resources": {"CPU": 3.0}}
    per_trial = {"cpu": 1, "gpu": 0, "workers": 2}
    placed = {"teacher_cache": None, "served_layout": None, "teacher_costs": None}
    off = tiny_config(teacher_server={"mode": "off", "cpus": 1})
    resolved, actors, parallel = runner.serve_teacher(off, placed, per_trial, 1, {"CPU": 3.0}, [node])
    assert resolved.teacher_server.mode == "off" and actors is None and parallel == 1
    with pytest.raises(UserError, match="one trial needs 2.01 CPUs"):   # where it may serve, the check stands
        runner.serve_teacher(tiny_config(teacher_server={"mode": "on", "cpus": 1}), placed, per_trial, 1,
                             {"CPU": 3.0}, [node])
