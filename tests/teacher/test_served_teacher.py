"""The served teacher (tune_kd/teacher/served.py, tune_kd/search/teacher_actor.py): one TeacherServer actor answers every trial's
batches with cache-format rows, batched across trials; a killed actor is restarted and its requests
retried; a teacher that cannot start stops the search with one line; nothing outlives the search."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import load_config
from tune_kd.data import inputs, tokenized
from tune_kd.kd.scored import ScoredLM
from tune_kd.kd.scoring import scored_positions
from tune_kd.model import build, hardware
from tune_kd.search import teacher_actor
from tune_kd.teacher import served
from tune_kd.teacher.stored_rows import layout
from tune_kd.train import loop

from conftest import search_raw, tiny_raw

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


def served_config(world, **sections):
    return load_config(raw=tiny_raw(world, teacher_server={"mode": "on", **sections.pop("teacher_server", {})},
                                    **sections))


def start(cfg, lay, cache_dir=None):
    import ray

    return teacher_actor.start(cfg, lay, cache_dir, [ray.get_runtime_context().get_node_id()], 0.0, "test")


def batches(cfg, count=3):
    tokenizer, train_data, _ = inputs.load_data(cfg)
    pad = tokenized.padding_id(tokenizer)
    return [tokenized.collate(train_data, np.arange(i * 8, i * 8 + 8 + i), pad) for i in range(count)], tokenizer


def local_teacher(cfg, tokenizer):
    precision = hardware.resolve_precision("float32", torch.device("cpu"))
    return ScoredLM(build.make_teacher(cfg.teacher, tokenizer, precision)), precision


def test_auto_serves_only_when_trials_would_share_a_live_teacher(tiny_config):
    cfg = tiny_config()
    assert served.decide(cfg, 2, cache_used=False)[0]
    assert not served.decide(cfg, 1, cache_used=False)[0]              # one trial per node holds the only copy
    assert not served.decide(cfg, 4, cache_used=True)[0]               # the cache answers the batches
    assert served.decide(tiny_config(train={"on_policy_fraction": 0.5}), 4, cache_used=True)[0]
    assert not served.decide(tiny_config(teacher_server="off"), 4, cache_used=False)[0]
    assert not served.decide(tiny_config(train={"alpha": 1.0}), 4, cache_used=False)[0]
    assert not served.decide(tiny_config(train={"feature_weight": 0.1}), 4, cache_used=False)[0]
    assert served.decide(tiny_config(teacher_server="on"), 1, cache_used=True)[0]


def test_served_rows_are_the_local_teachers(world, local_ray):
    """Full rows (a small vocabulary) are the teacher's logits; top-k rows its k largest, shifted;
    the target log-probs its exact log p(next token); rows in scored_positions' order."""
    cfg = served_config(world)
    group, tokenizer = batches(cfg)
    teacher, precision = local_teacher(cfg, tokenizer)
    vocab = len(tokenizer)
    for lay in (layout(vocab, vocab), layout(8, vocab, "float32"), layout(8, vocab, "bfloat16")):
        actors = start(cfg, lay)
        try:
            remote = teacher_actor.ServedTeacher(actors.handles[0])
            for batch in group:
                positions, targets = scored_positions(batch["labels"])
                rows = remote.rows(batch["input_ids"], positions)[0]
                target_logprobs = rows.target_logprobs
                with torch.inference_mode():
                    logits = teacher(batch["input_ids"], positions)[0].logits().float()
                assert rows.values.shape[0] == targets.numel() == target_logprobs.numel()
                expected = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
                torch.testing.assert_close(target_logprobs, expected, atol=1e-5, rtol=1e-5)
                if lay.full:
                    assert rows.ids is None
                    torch.testing.assert_close(rows.values, logits, atol=1e-5, rtol=1e-5)
                else:
                    top = logits.topk(8, dim=1)
                    assert torch.equal(rows.ids, top.indices)
                    tolerance = 2.0 ** -7 if lay.dtype == "bfloat16" else 1e-5     # bf16 keeps 8 significant bits
                    torch.testing.assert_close(rows.values, top.values - top.values[:, :1], atol=tolerance * 20,
                                               rtol=tolerance)
        finally:
            actors.stop()


def test_concurrent_requests_share_forwards_and_get_their_own_rows(world, local_ray):
    cfg = served_config(world, teacher_server={"max_wait_ms": 300})
    group, tokenizer = batches(cfg, count=4)
    actors = start(cfg, layout(len(tokenizer), len(tokenizer)))
    try:
        remote = teacher_actor.ServedTeacher(actors.handles[0])
        solo = [remote.rows(b["input_ids"], scored_positions(b["labels"])[0])[0].values.clone() for b in group]
        before = actors.stats()[0]
        answers = [None] * len(group)

        def ask(i):
            answers[i] = remote.rows(group[i]["input_ids"], scored_positions(group[i]["labels"])[0])[0].values

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(group))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        after = actors.stats()[0]
        assert after["requests"] - before["requests"] == 4
        assert after["forwards"] - before["forwards"] < 4            # batched: fewer forwards than requests
        for mine, alone in zip(answers, solo):                        # padding to another width changes nothing
            torch.testing.assert_close(mine, alone, atol=1e-5, rtol=1e-5)
    finally:
        actors.stop()


def run_served(cfg, actors, step_hook=None):
    return loop.train(cfg, step_hook=step_hook, node_teacher=lambda: teacher_actor.node_teacher(cfg, "a-trial"))


def test_a_served_run_trains_as_a_local_one_and_survives_a_killed_teacher(world, local_ray):
    """The loop with the served teacher (training batches, on-policy batches, evaluation, val_gen_ce)
    gives the local teacher's losses; kill -9 of the teacher's process mid-epoch: Ray restarts it,
    the request in flight is retried, and the run ends with exactly the same losses."""
    import ray

    sections = dict(train={"epochs": 2, "on_policy_fraction": 0.5, "on_policy_start": 0.25, "max_new_tokens": 8},
                    data={"max_train_examples": 400}, eval={"generation_samples": 8}, teacher_cache={"mode": "off"})
    local = loop.train(load_config(raw=tiny_raw(world, **sections)))
    cfg = served_config(world, **sections)
    tokenizer = inputs.run_tokenizers(cfg).student
    actors = start(cfg, layout(len(tokenizer), len(tokenizer)))
    try:
        calm = run_served(cfg, actors)
        first_pid = ray.get(actors.handles[0].info.remote())["pid"]
        killed = []

        def kill_at_step_3(epoch, step, _):
            if (epoch, step) == (1, 3):
                os.kill(first_pid, signal.SIGKILL)
                killed.append(first_pid)
        stormy = run_served(cfg, actors, kill_at_step_3)
        assert killed and ray.get(actors.handles[0].info.remote())["pid"] != first_pid     # restarted
    finally:
        actors.stop()
    for name in ("train_loss", "val_ce", "val_kl", "val_loss", "val_gen_ce"):
        for a, b in zip(local.history, calm.history):
            assert b[name] == pytest.approx(a[name], rel=1e-4), name
        assert [h[name] for h in stormy.history] == [h[name] for h in calm.history], name
    assert all(h["on_policy_s_per_batch"] > 0 for h in calm.history[1:])


def test_a_teacher_that_cannot_start_stops_with_one_line(world, local_ray, tmp_path):
    import ray

    broken = tmp_path / "teacher"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        source = Path(world["teacher"]) / name
        if source.is_file():
            (broken / name).write_bytes(source.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg = served_config(world, teacher={"path": str(broken)})
    with pytest.raises(UserError) as caught:
        start(cfg, layout(8, 100, "float32"))
    message = str(caught.value)
    assert "teacher_server: the served teacher could not start" in message and "\n" not in message
    assert not [a for a in ray.util.list_named_actors() if str(a).startswith(teacher_actor.ACTOR_PREFIX)]


def test_serving_refuses_runs_that_need_the_teacher_itself(world):
    from tune_kd.config.errors import ConfigError

    with pytest.raises(ConfigError, match="teacher_server.mode: a served teacher answers with scored rows only"):
        load_config(raw=tiny_raw(world, teacher_server="on", train={"feature_weight": 0.5}))
    # a run outside a search (Ray up or not) finds no served teacher: one line saying so
    with pytest.raises(UserError, match="teacher_server: on, but (no served teacher runs|this run is not part of)"):
        loop.train(served_config(world, train={"epochs": 1}))


@pytest.mark.slow
def test_a_served_search_runs_on_policy_trials_and_takes_its_teacher_with_it(world, tmp_path, capsys):
    """Two trials at a time sharing one served teacher (teacher_server: on; auto keeps a teacher per
    trial on a CPU node, where serving is slower: test_served_choice.py), on-policy batches and warm
    start searched: every trial completes or is stopped by ASHA, none errors, the served teacher
    answered, and no teacher actor is left once the search returns."""
    import ray

    from tune_kd.search import runner

    if ray.is_initialized():   # the module's local_ray (4 CPUs): this search starts and ends its own Ray
        ray.shutdown()
    raw = search_raw(world, num_samples=4, train={"epochs": 2, "on_policy_fraction": 0.5, "max_new_tokens": 8},
                     data={"max_train_examples": 400}, eval={"generation_samples": 8}, teacher_server={"mode": "on"})
    raw["parameters"]["on_policy_start"] = {"distribution": "uniform", "min": 0.0, "max": 0.75}
    cfg = load_config(raw=raw)
    summary = runner.run_search(cfg, "test", storage=str(tmp_path), num_cpus=2, dashboard_host=None)
    out = capsys.readouterr().out
    assert summary["parallel"] == 2
    assert {r["status"] for r in summary["rows"]} <= {"COMPLETED", "STOPPED_EARLY"}
    assert "served teacher:" in out and summary["served_teacher"].startswith("served teacher:")
    assert not ray.is_initialized()   # the search's own Ray is gone, and its actors with it


@pytest.mark.slow
def test_ctrl_c_leaves_no_teacher_process(world, tmp_path):
    """Ctrl-C in the terminal (SIGINT to the search's process group) while trials run: the search
    exits and no TeacherServer process is left on the machine."""
    raw = search_raw(world, num_samples=4, train={"epochs": 3}, teacher_server={"mode": "on"},
                     data={"max_train_examples": 400})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    log_path = tmp_path / "search.log"
    with log_path.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "tune_kd.search", "--space", str(space), "--storage",
                                   str(tmp_path / "out"), "--num-cpus", "2", "--no-dashboard"], cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and "epoch 1/3" not in log_path.read_text():
            time.sleep(1)
        assert "epoch 1/3" in log_path.read_text(), log_path.read_text()[-3000:]
        assert teacher_processes(), "the served teacher was not running"
        os.killpg(driver.pid, signal.SIGINT)
        driver.wait(timeout=120)
    deadline = time.time() + 60
    while time.time() < deadline and teacher_processes():
        time.sleep(1)
    assert teacher_processes() == [], log_path.read_text()[-3000:]


def teacher_processes() -> list[str]:
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in listing if "TeacherServer" in line]


def test_a_run_reads_its_teacher_from_a_vllm_style_endpoint(world, monkeypatch):
    """teacher_server.url: the loop never loads the teacher's weights and asks the endpoint for every
    batch (training, on-policy, evaluation, val_gen_ce). With top_k = vocabulary - 1 the one-token
    tail is exact, so the run's losses are the local teacher's."""
    from transformers import AutoModelForCausalLM

    from standin_vllm import StandinVLLM

    sections = dict(train={"epochs": 1, "on_policy_fraction": 0.5, "on_policy_start": 0.5, "max_new_tokens": 8},
                    data={"max_train_examples": 200}, eval={"generation_samples": 8}, teacher_cache={"mode": "off"})
    local = loop.train(load_config(raw=tiny_raw(world, **sections)))
    columns = len(inputs.run_tokenizers(load_config(raw=tiny_raw(world))).student)
    with StandinVLLM(max_logprobs=columns) as server:
        server.model = AutoModelForCausalLM.from_pretrained(world["teacher"], dtype=torch.float32).eval()
        server.name = "world/teacher"
        cfg = load_config(raw=tiny_raw(world, teacher_server={"url": server.url, "top_k": columns - 1}, **sections))
        monkeypatch.setattr(build, "make_teacher", lambda *a, **k: pytest.fail("the teacher's weights were loaded"))
        remote = loop.train(cfg)
        assert len(server.posts) > 10
    for name in ("train_loss", "val_ce", "val_kl", "val_gen_ce"):
        assert remote.history[0][name] == pytest.approx(local.history[0][name], rel=2e-3), name
