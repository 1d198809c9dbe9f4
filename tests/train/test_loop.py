"""End-to-end CPU runs of the training loop: learning, reporting, saving, reloading, resuming."""

import json
import math
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tune_kd.data import tokenized
from tune_kd.results.reading import METRICS
from tune_kd.search import demo
from tune_kd.train.loop import PHASES, train
from tune_kd.train.step import lr_at

from conftest import tiny_raw


def test_lr_schedule_is_the_seeds_cosine_after_warmup():
    lr = 1e-3
    assert lr_at(0, 100, lr, warmup=10) == pytest.approx(lr / 10)
    assert lr_at(9, 100, lr, warmup=10) == pytest.approx(lr)
    assert lr_at(10, 100, lr, warmup=10) == pytest.approx(lr / 10 + lr)          # cos(0) = 1
    assert lr_at(100, 100, lr, warmup=10) == pytest.approx(lr / 10)              # cos(pi) = -1
    assert lr_at(0, 100, lr, warmup=0) == pytest.approx(lr / 10 + lr)


def test_distils_reports_each_epoch_and_saves_a_reloadable_student(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(train={"epochs": 2})
    reports = []

    def report(metrics, save):
        reports.append(dict(metrics))
        save(tmp_path / f"epoch{metrics['epoch']}")
        time.sleep(0.5)   # a slow report: phase_seconds counts it in the next epoch's figure

    started = time.perf_counter()
    result = train(cfg, report=report)
    wall = time.perf_counter() - started
    assert [r["epoch"] for r in reports] == [1, 2]
    # where the run's time went: every phase, summed since the start, never more than the run took
    first, second = (r["phase_seconds"] for r in reports)
    assert set(first) == set(PHASES)
    assert all(second[k] >= first[k] >= 0 for k in PHASES) and second["steps"] > first["steps"] > 0
    assert first["build"] > 0 and first["eval"] > 0 and second["build"] == first["build"]
    assert first["report"] == 0 and second["report"] >= 0.5
    assert sum(second.values()) < wall - 0.5   # the last report (0.5 s asleep) is in no figure
    assert all(set(METRICS) <= set(r) for r in reports)
    unmeasured = ("gpu_peak_gib", "val_gen_acc", "val_gen_ce")   # CPU: no GPU figure; eval.generation_samples 0
    assert all(math.isfinite(r[k]) for r in reports for k in METRICS if k not in unmeasured)
    assert all(math.isnan(r[k]) for r in reports for k in unmeasured)
    assert reports[1]["val_ce"] < reports[0]["val_ce"]
    assert reports[0]["tokens_per_s"] > 0 and 0.0 <= reports[1]["val_acc"] <= 1.0

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "epoch2")).eval()
    ids = torch.randint(4, 60, (2, 12))
    result.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.student(input_ids=ids).logits)


def test_val_ce_of_untrained_student_is_near_uniform(tiny_config):
    cfg = tiny_config(train={"epochs": 1, "learning_rate": 1e-9})
    result = train(cfg)
    vocab = result.student.config.vocab_size
    assert abs(result.metrics["val_ce"] - math.log(vocab)) < 0.5


@pytest.mark.parametrize("extra", [{}, {"feature_weight": 1.0}], ids=["logits", "with-feature-projector"])
def test_resume_after_epoch_one_matches_uninterrupted_run(tiny_config, tmp_path, extra):
    cfg = tiny_config(train={"epochs": 2, "accumulation_steps": 2, **extra})
    full = train(cfg)

    class Interrupt(Exception):
        pass

    def stop_after_first(metrics, save):
        save(tmp_path / "ckpt")
        raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, report=stop_after_first)
    resumed = train(cfg, resume_from=tmp_path / "ckpt")
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for a, b in zip(full.student.parameters(), resumed.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert resumed.metrics["val_ce"] == pytest.approx(full.metrics["val_ce"], rel=1e-4)


def test_mid_epoch_checkpoint_resumes_the_same_run(tiny_config, tmp_path):
    cfg = tiny_config(train={"epochs": 1, "save_interval": 5})
    full = train(cfg)
    batches = len(tokenized.epoch_batches(tokenized.tokenize_cached(cfg.data.path, full.tokenizer, 64, cfg.data.cache_dir),
                                     cfg.train.batch_size, 0, 0))
    assert batches > 5
    saved = []
    from tune_kd.model import checkpoint

    original = checkpoint.save_checkpoint

    def save_then_stop(directory, *args):
        original(directory, *args)
        saved.append(args[4].batch)   # the Progress
        raise KeyboardInterrupt  # the process dies right after the step-5 checkpoint

    checkpoint.save_checkpoint = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, out_dir=tmp_path)
    finally:
        checkpoint.save_checkpoint = original
    assert saved == [5]
    resumed = train(cfg, resume_from=tmp_path / "last")
    for a, b in zip(full.student.parameters(), resumed.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_plain_sft_needs_no_teacher_forward(tiny_config, monkeypatch):
    from tune_kd.train import step

    cfg = tiny_config(train={"epochs": 1, "alpha": 1.0})
    needs = []
    original = step.forward_pair
    def recording(student, teacher, batch, precision, from_data=False):
        needs.append((torch.is_grad_enabled(), teacher is not None))
        return original(student, teacher, batch, precision, from_data)

    monkeypatch.setattr(step, "forward_pair", recording)
    result = train(cfg)
    assert {need for grad, need in needs if grad} == {False}   # training steps: no teacher forward
    assert {need for grad, need in needs if not grad} == {True}  # validation still measures val_kl
    assert math.isfinite(result.metrics["val_kl"])
    assert result.metrics["val_loss"] == pytest.approx(result.metrics["val_ce"])


def test_temperature_and_alpha_change_the_run(tiny_config):
    base = train(tiny_config(train={"epochs": 1}))
    hotter = train(tiny_config(train={"epochs": 1, "temperature": 4.0}))
    more_ce = train(tiny_config(train={"epochs": 1, "alpha": 0.9}))
    assert hotter.metrics["train_loss"] != pytest.approx(base.metrics["train_loss"], rel=1e-3)
    assert more_ce.metrics["train_loss"] != pytest.approx(base.metrics["train_loss"], rel=1e-3)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_loss_that_stops_being_finite_stops_training_at_once(tiny_config, poison):
    from tune_kd.train.loop import TrainingDiverged

    reports, steps = [], []

    def poison_after_two_steps(epoch, step, student):
        steps.append(step)
        if step == 2:
            with torch.no_grad():
                student.model.norm.weight.fill_(poison)

    with pytest.raises(TrainingDiverged, match="loss became (nan|inf) at epoch 1 step 3 .*lower train.learning_rate"):
        train(tiny_config(), report=lambda metrics, save: reports.append(metrics), step_hook=poison_after_two_steps)
    assert steps == [1, 2, 3] and not reports       # the first bad step is the last, no epoch was reported


def test_a_loss_gone_nan_is_caught_before_a_mid_epoch_checkpoint_as_on_gpu(tiny_config, tmp_path, monkeypatch):
    """On GPU the loss is read only every log_interval steps (a read is a device sync), yet never
    less often than `last/` is saved: a checkpoint holds no weights of a diverged run."""
    from safetensors.torch import load_file

    from tune_kd.model.checkpoint import TRAINER_STATE
    from tune_kd.train import loop

    check = loop.divergence_check_due
    monkeypatch.setattr(loop, "divergence_check_due", lambda step, device, t: check(step, torch.device("cuda"), t))

    def poison_after_step_four(epoch, step, student):   # step 5's loss is NaN, and so are the weights after it
        if step == 4:
            with torch.no_grad():
                student.model.norm.weight.fill_(float("nan"))

    cfg = tiny_config(train={"epochs": 1, "save_interval": 3, "log_interval": 10})
    with pytest.raises(loop.TrainingDiverged, match="loss became nan at epoch 1 step 6 "):
        train(cfg, out_dir=tmp_path, step_hook=poison_after_step_four)
    assert torch.load(tmp_path / "last" / TRAINER_STATE, weights_only=True)["progress"]["step"] == 3
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "last" / "model.safetensors").values())


def test_temperature_schedules_go_from_temperature_to_final_temperature(tiny_config):
    from tune_kd.train.step import temperature_at

    def at(schedule, step, total=101):
        return temperature_at(step, total, tiny_config(train={"temperature": 5.0, "final_temperature": 1.0,
                                                              "temperature_schedule": schedule}).train)

    assert [at("constant", s) for s in (0, 50, 100)] == [5.0, 5.0, 5.0]
    assert [at("linear", s) for s in (0, 25, 50, 100)] == pytest.approx([5.0, 4.0, 3.0, 1.0])
    assert [at("cosine", s) for s in (0, 50, 100)] == pytest.approx([5.0, 3.0, 1.0])
    assert at("cosine", 25) > at("linear", 25)                  # cosine stays high longer
    assert at("linear", 500) == pytest.approx(1.0)              # never past the end


def test_feature_distillation_trains_a_projection_that_is_not_exported(tiny_config, tmp_path):
    from safetensors import safe_open

    from tune_kd.config.errors import UserError
    from tune_kd.kd import features
    from tune_kd.model.checkpoint import TRAINER_STATE

    assert features.layer_map(None, 2, 4) == [(1, 2), (2, 4)]    # evenly spaced, ending at both last layers
    assert features.layer_map(None, 3, 3) == [(1, 1), (2, 2), (3, 3)]
    with pytest.raises(UserError, match="pair .3, 1. is outside the models"):
        features.layer_map([[3, 1]], 1, 2)
    seen = []
    original = features.feature_loss_sum

    def recording(student_features, teacher_features, kind):
        seen.append((tuple(student_features[0].shape), tuple(teacher_features[0].shape), kind))
        return original(student_features, teacher_features, kind)

    cfg = tiny_config(train={"epochs": 1, "feature_weight": 1.0, "feature_loss": "cosine", "feature_layers": [[1, 1]]})
    features.feature_loss_sum = recording
    try:
        result = train(cfg, out_dir=tmp_path)
    finally:
        features.feature_loss_sum = original
    student_width, teacher_width = result.student.config.hidden_size, 64     # the test teacher is 64 wide
    assert seen and all(s[1] == teacher_width and t[1] == teacher_width and kind == "cosine" for s, t, kind in seen)
    state = torch.load(tmp_path / "last" / TRAINER_STATE, weights_only=True)
    assert state["extra"]["feature_projector"]["maps.0.weight"].shape == (teacher_width, student_width)
    with safe_open(str(tmp_path / "last" / "model.safetensors"), "pt") as handle:
        assert not [k for k in handle.keys() if "maps" in k or "projector" in k]


def ddp_rank(rank: int, raw: dict, port: int, out: str) -> None:
    """One of two gloo ranks running loop.train(ddp=True); writes the metrics it was reported. The
    short timeout turns a rank stuck in a collective its peer never joins into an error."""
    import torch.distributed as dist

    from tune_kd.config.experiment import load_config

    torch.set_num_threads(1)
    os.environ["RANK"] = str(rank)           # loop.train(ddp=True) checks it was launched as a rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    reports = []
    try:
        train(load_config(raw=raw), report=lambda metrics, save: reports.append(metrics), ddp=True,
              report_on_every_rank=True)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(reports))


@pytest.mark.slow
def test_ddp_evaluation_with_fewer_validation_batches_than_ranks(world, tmp_path):
    val = tmp_path / "val.jsonl"
    demo.write_jsonl(val, demo.make_conversations(10, seed=3))      # one batch of 32: rank 1 gets none
    raw = tiny_raw(world, data={"val_path": str(val), "max_train_examples": 128}, train={"epochs": 1},
                   teacher_cache={"mode": "off"})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = torch.multiprocessing.start_processes(ddp_rank, args=(raw, port, str(tmp_path)), nprocs=2, join=False,
                                                  start_method="spawn")
    deadline = time.monotonic() + 180
    while not ranks.join(timeout=5):         # raises when a rank failed (a collective timed out)
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the DDP run did not finish within 180 s")
    metrics = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    shared = ("epoch", "train_loss", "val_ce", "val_kl", "val_loss", "val_acc")
    assert [[m[k] for k in shared] for m in metrics[0]] == [[m[k] for k in shared] for m in metrics[1]]
    assert len(metrics[0]) == 1 and math.isfinite(metrics[0][0]["val_ce"])
