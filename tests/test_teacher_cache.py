"""The teacher-output cache: exactness at k = V, fidelity at the default k, invalidation, sharing."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tune_kd import data, loop, losses, models, teacher_cache
from tune_kd.config import ConfigError, UserError, load_config
from tune_kd.losses import KD_LOSSES

from conftest import tiny_raw


def setup_run(cfg):
    """(tokenizer, train split, teacher SelectedLogits, precision, teacher_cols, pad id) as loop.train has them."""
    precision = models.resolve_precision("float32", torch.device("cpu"))
    tokenizer, train_data, _ = loop.load_data(cfg)
    teacher_lm = models.make_teacher(cfg.teacher, tokenizer, precision)
    student_lm = models.make_student(cfg.student, tokenizer, precision)
    cols = models.check_compatibility(teacher_lm, student_lm, tokenizer)
    return tokenizer, train_data, loop.SelectedLogits(teacher_lm), precision, cols, tokenizer.pad_token_id


def open_cache(cfg, tmp_path=None):
    tokenizer, train_data, teacher, precision, cols, pad = setup_run(cfg)
    return loop.open_teacher_cache(cfg, tokenizer, train_data, teacher, precision, cols, pad)[0], train_data, teacher


def live_and_cached(cfg, cache, train_data, teacher, indices, temperature, kd_loss="forward_kl"):
    """The KD term and its gradient w.r.t. the student's logits, from the live teacher and from the cache,
    on the batch of `indices` (the same rows the loop would select)."""
    precision = models.resolve_precision("float32", torch.device("cpu"))
    batch = data.collate(train_data, np.asarray(indices), 0)
    live = loop.teacher_rows(teacher, precision, None)(batch)
    torch.manual_seed(0)
    student = torch.randn(live.shape) * 2.0
    out = []
    for teacher_side in (live, cache.rows(batch["indices"])):
        logits = student.clone().requires_grad_(True)
        kd = losses.distillation_loss(logits, teacher_side, torch.zeros(len(logits), dtype=torch.long), 0.0,
                                      temperature, 1.0, kd_loss, kd_options={"beta": 0.3} if kd_loss == "jsd" else {}).kd
        kd.backward()
        out.append((kd.detach(), logits.grad))
    return out


def test_the_cache_holds_the_full_distribution_when_k_is_the_vocab(tiny_config):
    cfg = tiny_config(teacher_cache={"mode": "on", "top_k": 10_000})
    cache, train_data, teacher = open_cache(cfg)
    assert cache.tail is None and cache.meta["top_k"] == cache.meta["vocab"]
    for kd_loss in KD_LOSSES:
        for temperature in (0.7, 1.0, 2.6, 5.0, 12.0):
            (live, live_grad), (cached, cached_grad) = live_and_cached(cfg, cache, train_data, teacher, [3, 0, 7, 5],
                                                                       temperature, kd_loss)
            torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cached_grad, live_grad, rtol=1e-4, atol=1e-7)


def fidelity_errors(tiny_config, cache_section: dict, temperatures) -> list[dict]:
    """teacher_cache.fidelity for a fresh student and one trained for an epoch, on 4 batches of 32."""
    from tune_kd.loop import train

    cfg = tiny_config(teacher_cache=cache_section)
    cache, train_data, teacher = open_cache(cfg)
    tokenizer, *_ = setup_run(cfg)
    precision = models.resolve_precision("float32", torch.device("cpu"))
    batches = [data.collate(train_data, np.arange(lo, lo + 32), tokenizer.pad_token_id) for lo in range(0, 128, 32)]
    torch.manual_seed(0)
    fresh = models.make_student(cfg.student, tokenizer, precision)
    trained = train(tiny_config(train={"epochs": 1}, teacher_cache="off")).student
    return [teacher_cache.fidelity(cfg, loop.SelectedLogits(student), teacher, cache, batches, precision, temperatures)
            for student in (fresh, trained)]


def test_fidelity_at_the_default_k(tiny_config):
    """At the default top_k the KD loss and its gradient (w.r.t. the student's parameters) stay within
    1% of the live teacher's for T in [1, 5], for a fresh student and for one trained a little."""
    for errors in fidelity_errors(tiny_config, {"mode": "on"}, [1.0, 1.25, 2.0, 2.7, 3.5, 5.0]):
        assert max(loss for loss, _ in errors.values()) <= 0.01, errors
        assert max(grad for _, grad in errors.values()) <= 0.01, errors


def test_a_top_k_below_the_vocab_is_close_at_low_temperature_and_drifts_as_t_grows(tiny_config):
    """k = 48 of 103: the estimated tail holds a growing share of the mass as T rises (see the README's
    curve): the loss stays within 1%, the gradient within 1% up to T = 3, and its error grows with T."""
    for errors in fidelity_errors(tiny_config, {"mode": "on", "top_k": 48}, [1.0, 2.0, 3.0, 5.0]):
        assert max(loss for loss, _ in errors.values()) <= 0.01, errors
        assert all(errors[t][1] <= 0.01 for t in (1.0, 2.0, 3.0)), errors
        grads = [errors[t][1] for t in (1.0, 2.0, 3.0, 5.0)]
        assert grads == sorted(grads) and grads[0] < 1e-3, errors


def test_the_tail_term_is_exact_at_its_grid_temperatures(tiny_config):
    cfg = tiny_config(teacher_cache={"mode": "on", "top_k": 8})
    cache, train_data, teacher = open_cache(cfg)
    precision = models.resolve_precision("float32", torch.device("cpu"))
    batch = data.collate(train_data, np.arange(4), 0)
    logits = loop.teacher_rows(teacher, precision, None)(batch)
    cached = cache.rows(batch["indices"])
    rest = logits.scatter(1, cached.ids, float("-inf"))
    for temperature in (1.0, 3.0):
        torch.testing.assert_close(cached.log_tail(temperature).squeeze(1), torch.logsumexp(rest / temperature, 1))
    between = cached.log_tail(2.5).squeeze(1)   # a chord of a convex function: at or above the truth
    assert (between >= torch.logsumexp(rest / 2.5, 1) - 1e-5).all()


def test_a_changed_teacher_data_or_length_is_rebuilt_never_read(world, tmp_path, monkeypatch):
    builds = []
    original = teacher_cache.build
    monkeypatch.setattr(teacher_cache, "build", lambda *a, **k: (builds.append(a[5].name), original(*a, **k)))
    def raw(data=None, **over):   # a cache folder of this test's own, so it counts every build
        return tiny_raw(world, teacher_cache={"mode": "on", "top_k": 8},
                        data={"cache_dir": str(tmp_path / "cache"), **(data or {})}, **over)

    first, _, _ = open_cache(load_config(raw=raw()))
    again, _, _ = open_cache(load_config(raw=raw()))
    assert len(builds) == 1 and again.directory == first.directory

    other_teacher = tmp_path / "teacher"
    cfg = load_config(raw=raw())
    tokenizer, _, teacher, *_ = setup_run(cfg)
    with torch.no_grad():
        next(teacher.lm.parameters()).add_(1e-3)
    from tune_kd.checkpoint import save_student
    save_student(teacher.lm, tokenizer, other_teacher)
    keys = {first.directory.name}
    for changed in (raw(teacher={"path": str(other_teacher)}), raw(data={"max_train_examples": 1000}),
                    raw(data={"max_seq_len": 48})):
        cache, _, _ = open_cache(load_config(raw=changed))
        keys.add(cache.directory.name)
    assert len(builds) == 4 and len(keys) == 4

    # a cache folder that does not match its meta (cut short, edited) is rebuilt
    values = first.directory / "values.npy"
    np.save(values, np.zeros((3, 8), np.float32))
    rebuilt, _, _ = open_cache(load_config(raw=raw()))
    assert len(builds) == 5 and rebuilt.values.shape[0] == rebuilt.meta["positions"]


def test_two_processes_build_once_and_read_the_same_rows(tiny_config, world):
    cfg = tiny_config(teacher_cache={"mode": "on", "top_k": 8}, data={"max_train_examples": 900})
    script = textwrap.dedent(f"""
        import json, os, sys
        import numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_teacher_cache import open_cache
        from tune_kd.config import load_config
        cache, train_data, _ = open_cache(load_config(raw=json.loads(sys.argv[1])))
        order = np.random.default_rng(int(sys.argv[2])).permutation(len(train_data))
        total = sum(float(cache.rows(order[i:i + 50]).values.double().sum()) for i in range(0, len(order), 50))
        print(json.dumps({{"built": cache.meta["built_by_pid"] == os.getpid(), "sum": total,
                          "dir": str(cache.directory)}}))
    """)
    raw = json.dumps(tiny_raw(world, teacher_cache={"mode": "on", "top_k": 8}, data={"max_train_examples": 900}))
    runs = [subprocess.Popen([sys.executable, "-c", script, raw, str(seed)], stdout=subprocess.PIPE, text=True)
            for seed in (1, 2)]
    outputs = [json.loads(run.communicate(timeout=300)[0].strip().splitlines()[-1]) for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert sorted(o["built"] for o in outputs) == [False, True]     # one built under the lock, one waited
    assert outputs[0]["dir"] == outputs[1]["dir"]
    expected = float(open_cache(cfg)[0].values.astype(np.float64).sum())
    assert outputs[0]["sum"] == pytest.approx(expected) and outputs[1]["sum"] == pytest.approx(expected)


def test_training_reads_the_cache_instead_of_running_the_teacher(tiny_config, monkeypatch):
    from tune_kd.loop import train

    calls = []
    original = loop.forward_pair

    def recording(student, teacher, batch, precision, teacher_cols, need_teacher, cache=None):
        calls.append((torch.is_grad_enabled(), cache is not None))
        return original(student, teacher, batch, precision, teacher_cols, need_teacher, cache)

    monkeypatch.setattr(loop, "forward_pair", recording)
    cached = train(tiny_config(train={"epochs": 1}, teacher_cache={"mode": "on", "top_k": 10_000}))
    assert {c for grad, c in calls if grad} == {True} and {c for grad, c in calls if not grad} == {False}
    calls.clear()
    live = train(tiny_config(train={"epochs": 1}, teacher_cache="off"))
    assert {c for _, c in calls} == {False}
    # k = V: the same run, up to float summation order
    assert cached.metrics["train_loss"] == pytest.approx(live.metrics["train_loss"], rel=1e-4)
    assert cached.metrics["val_ce"] == pytest.approx(live.metrics["val_ce"], rel=1e-4)


def test_when_auto_uses_the_cache(tiny_config):
    positions, vocab, free = 10_000, 103, 10 * 2**30
    assert teacher_cache.decide(tiny_config(), positions, vocab, free)[0]
    assert not teacher_cache.decide(tiny_config(teacher_cache="off"), positions, vocab, free)[0]
    use, why = teacher_cache.decide(tiny_config(train={"feature_weight": 0.5}), positions, vocab, free)
    assert not use and "hidden states" in why
    assert not teacher_cache.decide(tiny_config(train={"alpha": 1.0}), positions, vocab, free)[0]
    use, why = teacher_cache.decide(tiny_config(teacher_cache={"max_gb": 1e-6}), positions, vocab, free)
    assert not use and "max_gb" in why
    assert teacher_cache.decide(tiny_config(teacher_cache={"mode": "on", "max_gb": 1e-6}), positions, vocab, free)[0]
    assert not teacher_cache.decide(tiny_config(), positions, vocab, free_bytes=1000)[0]
    with pytest.raises(UserError, match="teacher_cache: on needs"):
        teacher_cache.decide(tiny_config(teacher_cache="on"), positions, vocab, free_bytes=1000)


def test_teacher_cache_in_yaml(world, tmp_path):
    path = tmp_path / "space.yaml"
    base = tiny_raw(world)
    import yaml

    for text, mode in (("off", "off"), ("on", "on"), ("auto", "auto")):
        path.write_text(yaml.safe_dump(base) + f"teacher_cache: {text}\n")
        assert load_config(path).teacher_cache.mode == mode           # YAML 1.1 reads on/off as booleans
    path.write_text(yaml.safe_dump({**base, "train": {**base["train"], "feature_weight": 0.5}})
                    + "teacher_cache: {mode: 'on', top_k: 0}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "teacher_cache.top_k: must be >= 1" in str(error.value)
    assert "teacher_cache.mode: on cannot serve feature distillation" in str(error.value)
