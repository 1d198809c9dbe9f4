"""The search end to end on local Ray (2 CPUs): ASHA, Optuna, summary, export, faults, resume."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tune_kd.config.errors import UserError
from tune_kd.config.experiment import load_config
from tune_kd.data import inputs, tokenized
from tune_kd.kd.scored import ScoredLM
from tune_kd.model import checkpoint
from tune_kd.search.fault_drills import FAULT_FILE_ENV
from tune_kd.train.evaluate import evaluate

from conftest import TINY_ARCH, check_study_agrees, render_in_chromium, search_raw

REPO = Path(__file__).resolve().parents[2]
def epochs_by_trial(experiment_dir: Path) -> dict[str, list[int]]:
    out = {}
    for result in experiment_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = [r["epoch"] for r in rows]
    return out


class ActorProbe:
    """A Tune callback that asks Ray's state API (served by the dashboard) for the live actors."""

    def __init__(self, dashboard_urls: list | None = None):
        self.class_names, self.http = set(), {}
        self.dashboard_urls = dashboard_urls if dashboard_urls is not None else []   # filled once Ray is up

    def __getattr__(self, name):   # every other Callback hook: do nothing
        if name.startswith("on_") or name in ("setup", "get_state", "set_state"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        import ray
        from ray.util.state import list_actors

        # this search's Ray by its GCS address: "auto" fails when another Ray runs on the machine
        for actor in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")]):
            self.class_names.add(actor.class_name)
        if self.dashboard_urls and not self.http:   # the dashboard's HTTP API, asked without a token
            import urllib.error
            import urllib.request

            for path in ("/api/authentication_mode", "/api/jobs/"):
                try:
                    with urllib.request.urlopen(f"http://{self.dashboard_urls[0]}{path}", timeout=10) as response:
                        self.http[path] = (response.status, response.read().decode())
                except urllib.error.HTTPError as exc:
                    self.http[path] = (exc.code, "")


@pytest.mark.slow
def test_search_end_to_end(world, tmp_path, capsys):
    import optuna
    import ray
    import torch
    from ray.tune import Callback
    from transformers import AutoModelForCausalLM

    from tune_kd.model import hardware
    from tune_kd.search import runner

    class Probe(ActorProbe, Callback):
        pass

    urls = []
    probe = Probe(urls)
    cfg = load_config(raw=search_raw(world, controls={"plain_sft": True, "minimind_defaults": True, "seeds": 2},
                                     search={"sampler": "auto"}))   # the default's sampler, end to end
    original_init = ray.init

    def init_and_record(*args, **kwargs):
        context = original_init(*args, **kwargs)
        urls.append(context.dashboard_url)
        return context

    ray.init = init_and_record
    try:
        summary = runner.run_search(cfg, "test", storage=str(tmp_path), num_cpus=2, callbacks=[probe])
    finally:
        ray.init = original_init
    experiment = tmp_path / "tiny-search"

    # the dashboard was up on loopback and listed the trial actors while trials ran
    assert urls and urls[0].startswith("127.0.0.1:")
    assert probe.http["/api/authentication_mode"] == (200, '{"authentication_mode": "token"}')
    assert probe.http["/api/jobs/"][0] == 401                      # no token, no job submission
    assert any(name.startswith("distill_tiny_search") for name in probe.class_names), probe.class_names
    assert summary["parallel"] == 2

    rows = summary["rows"]
    assert len(rows) == 6 and len((experiment / "trials.csv").read_text().splitlines()) == 7
    assert any(r["status"] == "STOPPED_EARLY" for r in rows)
    for trial, epochs in epochs_by_trial(experiment).items():
        assert epochs == list(range(1, len(epochs) + 1)), (trial, epochs)

    study = optuna.load_study(study_name="tiny-search", storage=f"sqlite:///{experiment / 'optuna.db'}")
    states = {t.state.name for t in study.trials}
    assert {"PRUNED", "COMPLETE"} <= states
    first = study.trials[0].params            # the YAML's own train settings are evaluated first
    assert first == {"learning_rate": 3e-3, "temperature": 2.0, "alpha": 0.5}
    assert all(t.intermediate_values for t in study.trials)

    # the exported student reloads and scores the reported best val_ce
    best = json.loads((experiment / "best.json").read_text())
    exported = experiment / "best_student"
    meta = json.loads((exported / "tune_kd.json").read_text())
    assert meta["trial_id"] == best["trial_id"] and meta["metrics"]["val_ce"] == pytest.approx(best["best_val_ce"])
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (exported / name).is_file(), name
    student = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    tokenizer, _, val_data = inputs.load_data(cfg)
    precision = hardware.resolve_precision("float32", torch.device("cpu"))
    metrics = evaluate(ScoredLM(student), None, val_data, tokenizer.pad_token_id, cfg, precision)
    assert metrics["val_ce"] == pytest.approx(best["best_val_ce"], rel=1e-5)
    assert list(experiment.glob("trial_*/events.out.tfevents*"))   # TensorBoard logs

    # control arms: full budget, same seed; plain SFT is the best trial's settings with alpha 1
    captured = capsys.readouterr()
    out = captured.out
    arms = json.loads((experiment / "controls.json").read_text())["arms"]
    assert list(arms) == ["plain_sft", "minimind_defaults", "best_seed_1", "plain_sft_seed_1", "best_seed_2",
                          "plain_sft_seed_2"]
    assert arms["plain_sft"]["settings"] == {"learning_rate": best["learning_rate"],
                                             "temperature": best["temperature"], "alpha": 1.0}
    assert arms["minimind_defaults"]["settings"] == {"learning_rate": 5e-6, "alpha": 0.0, "temperature": 1.0}
    assert all(arm["epochs"] == 3 and math.isfinite(arm["value"]) for arm in arms.values())
    assert arms["minimind_defaults"]["value"] > arms["plain_sft"]["value"]   # lr 5e-6 barely moves in 3 tiny epochs
    seeds = [arms["best_seed_1"]["value"], arms["best_seed_2"]["value"]]
    assert seeds[0] != seeds[1]                                           # the seed reaches init and data order
    assert seeds[0] != arms["plain_sft_seed_1"]["value"]                  # plain SFT is re-trained, not copied
    # the verdict with its measured noise, and the teacher's own point, by default
    document = json.loads((experiment / "controls.json").read_text())
    verdict = next(line for line in out.splitlines() if line.startswith("did distillation help? "))
    assert verdict.split(": ")[0].split("? ")[1] in ("yes", "no", "within noise"), verdict
    assert "(the best config re-trained, 2 seeds) vs " in verdict and "(plain SFT, 3 seeds)" in verdict
    assert f"95% interval of the gap ±{document['seed_gap']['half_width']:.4f}" in verdict
    teacher = json.loads((experiment / "teacher_point.json").read_text())
    assert "teacher (evaluated on the validation set as a student is, " in out
    assert f"val_ce {teacher['val_ce']:.4f}" in out and "the teacher itself" in verdict
    assert "the verdict's noise: 4 of the 6 arms re-train the best config and plain SFT on 2 more seed(s)" in out
    # progress: a line per trial epoch and the search's own line, for the search and the controls
    assert "search: 6/6 trials done" in out and "controls: 6/6 trials done" in out
    assert "sampler: a Gaussian process, Optuna's GPSampler taught by ASHA's stopped trials (search.sampler auto: " \
           "3 searched keys, at most 5)" in out
    assert out.count("trial ") >= 6 and " epoch 1/3  val_ce " in out and "arm plain_sft epoch 3/3" in out
    # each trial's own log lines go to its folder, not to the terminal
    logs = "".join(p.read_text() for p in experiment.glob("trial_*/stderr.log"))
    assert "train: " in logs and "precision: " in logs
    assert "precision: " not in out + captured.err

    # the report opens in a browser with every figure drawn
    dom = render_in_chromium(experiment / "report.html")
    assert 'data-figures="5"' in dom and 'data-rendered="5"' in dom, dom[:500]
    for figure in ("curves", "params", "parallel", "importance", "controls"):
        assert f'id="{figure}"' in dom and (experiment / "report" / f"{figure}.png").is_file()
    assert "did distillation help?" in dom and "<td>teacher itself</td>" in dom
    samples = dom.split('<table id="samples">')[1].split("</table>")[0]   # the real arm and export are found
    assert all(f"<th>{column}</th>" in samples for column in ("teacher", "best student", "plain SFT"))


@pytest.mark.slow
def test_a_teacher_no_better_than_plain_sft_is_the_verdicts_reason(world, tmp_path, capsys):
    """A deliberately weak teacher (random weights, never trained): the search measures it on the
    validation set, and the verdict names it as the reason distillation has nothing to give."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tune_kd.search import runner

    tokenizer = AutoTokenizer.from_pretrained(world["tokenizer"])
    torch.manual_seed(0)
    weak = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **dict(TINY_ARCH, hidden_size=64),
                                        pad_token_id=tokenizer.pad_token_id))
    checkpoint.save_student(weak, tokenizer, tmp_path / "weak_teacher")
    cfg = load_config(raw=search_raw(dict(world, teacher=str(tmp_path / "weak_teacher")), num_samples=2,
                                     train={"epochs": 1}, scheduler={"type": "none"},
                                     controls={"plain_sft": True, "seeds": 1}))
    summary = runner.run_search(cfg, "test", storage=str(tmp_path), num_cpus=2, dashboard_host=None)
    out = capsys.readouterr().out
    teacher = json.loads((tmp_path / "tiny-search" / "teacher_point.json").read_text())
    plain = summary["controls"]["seed_gap"]["plain"]["mean"]
    assert teacher["val_ce"] > plain                   # random weights: about log(vocabulary) nats
    verdict = next(line for line in out.splitlines() if line.startswith("did distillation help? "))
    assert verdict.endswith(f"; the teacher itself reaches only val_ce {teacher['val_ce']:.4f}, no better than plain "
                            f"SFT's {plain:.4f}: it has little to transfer (use a stronger or longer-trained teacher, "
                            "or a smaller student)")
    assert "(plain SFT, 2 seeds)" in verdict and "95% interval of the gap" in verdict
    assert "little to transfer" in (tmp_path / "tiny-search" / "report.html").read_text()


def run_with_faults(world, tmp_path, monkeypatch, plans: list[dict], trials: int = 4,
                    **search_section) -> tuple[dict, list[dict]]:
    """A search of `trials` trials (no early stopping) under the given fault plans; (summary, plans after)."""
    import ray

    from tune_kd.search import runner

    fault = tmp_path / "fault.json"
    fault.write_text(json.dumps(plans))
    monkeypatch.setenv(FAULT_FILE_ENV, str(fault))   # inherited by the Ray workers started below
    cfg = load_config(raw=search_raw(world, num_samples=trials, search=search_section, scheduler={"type": "none"}))
    summary = runner.run_search(cfg, "test", storage=str(tmp_path), num_cpus=2)
    assert not ray.is_initialized()
    plans = json.loads(fault.read_text())
    assert all(plan["times"] == 0 for plan in plans)             # the faults really fired
    assert len(summary["rows"]) == trials                          # the search went on
    for trial, epochs in epochs_by_trial(tmp_path / "tiny-search").items():
        assert epochs == list(range(1, len(epochs) + 1))          # a retry resumes, never repeats an epoch
    assert (tmp_path / "tiny-search" / "best_student" / "model.safetensors").is_file()
    return summary, plans


@pytest.mark.slow
@pytest.mark.parametrize("kind,times,search_section,errored,reason", [
    ("oom", 2, {"max_failures": 1, "max_concurrent": 1}, 1, "CUDA out of memory"),  # retried once, fails again
    ("disk_full", 1, {"max_failures": 0}, 1, "no space left on the device"),
])
def test_failing_trials_are_retried_or_marked_errored(world, tmp_path, monkeypatch, capfd, kind, times,
                                                      search_section, errored, reason):
    # two trials: one takes the fault, the other shows the search goes on
    summary, plans = run_with_faults(world, tmp_path, monkeypatch, [{"kind": kind, "epoch": 2, "times": times}],
                                     trials=2, **search_section)
    rows = {r["trial_id"]: r for r in summary["rows"]}
    failed = [r for r in rows.values() if r["status"] == "ERROR"]
    assert len(failed) == errored
    assert all(reason in r["error"] for r in failed)
    assert sum(r["status"] == "COMPLETED" for r in rows.values()) == 2 - errored
    if errored and times == 2:
        assert len(set(plans[0]["fired_by"])) == 1                 # one trial failed twice: retry, then ERROR
        # each failure one line on the terminal, never Ray's traceback: the retry, then the ERROR
        terminal = "".join(capfd.readouterr())
        trial = failed[0]["trial_id"]
        lines = [line for line in terminal.splitlines() if line.startswith(f"trial {trial}")]
        assert any(line.startswith(f"trial {trial}: ") and reason in line and "; retrying from epoch " in line
                   for line in lines), terminal
        assert any(line.startswith(f"trial {trial} failed after 1 retry: ") and reason in line for line in lines)
        assert "Traceback" not in terminal and "Trial task failed" not in terminal
    for r in failed:   # the failed trial's epoch-1 checkpoint is still there, complete
        trial_dir = tmp_path / "tiny-search" / f"trial_{r['trial_id']}"
        assert [c for c in trial_dir.glob("checkpoint_*") if checkpoint.is_complete(c)]
    from tune_kd.search.runner import trials_out_of_room
    full = trials_out_of_room(summary["rows"])   # the search's last line (exit 2) when a disk filled
    assert (full is not None) == (kind == "disk_full")
    if full:
        assert full.startswith(f"1 trial(s) stopped on a full disk ({failed[0]['trial_id']}): ")
        assert "no space left on the device (" in full and full.endswith("(the finished trials and the summary above "
                                                                          "are kept)")


@pytest.mark.slow
def test_diverged_and_killed_trials(world, tmp_path, monkeypatch, capfd):
    """One trial's weights turn NaN (it stops at once, DIVERGED with its reason); another trial's worker
    process is SIGKILLed mid-epoch (it resumes from its epoch-1 checkpoint and completes). The kill is
    one line on the terminal, not Ray's traceback, and the search line counts the trial as running
    while it is retried."""
    summary, plans = run_with_faults(world, tmp_path, monkeypatch, [
        {"kind": "nan", "epoch": 1, "step": 2, "times": 1},
        {"kind": "kill", "epoch": 2, "step": 3, "times": 1}], max_failures=1)
    rows = {r["trial_id"]: r for r in summary["rows"]}
    diverged, killed = plans[0]["fired_by"][0], plans[1]["fired_by"][0]
    out, err = capfd.readouterr()
    terminal = out + err
    lines = terminal.splitlines()
    retry = [i for i, line in enumerate(lines) if line.startswith(f"trial {killed}: worker died (pid ")]
    assert len(retry) == 1 and "); retrying from epoch 1 (retry 1 of 1; full error: " in lines[retry[0]], terminal
    for text in ("Traceback", "ActorDiedError", "A worker died or was killed", "Trial task failed"):
        assert text not in terminal, text
    resumed = next(i for i, line in enumerate(lines) if line.startswith(f"trial {killed} epoch 2/3"))
    during = [line for line in lines[retry[0]:resumed] if line.startswith("search: ")]
    assert all(" 0 running" not in line for line in during), during
    assert diverged != killed
    assert rows[diverged]["status"] == "DIVERGED" and rows[diverged]["epochs"] == 1
    assert "loss became nan at epoch 1 step 3" in rows[diverged]["error"]
    assert rows[killed]["status"] == "COMPLETED"
    assert epochs_by_trial(tmp_path / "tiny-search")[killed] == [1, 2, 3]
    assert sum(r["status"] == "COMPLETED" for r in rows.values()) == 3
    trials_csv = (tmp_path / "tiny-search" / "trials.csv").read_text()
    assert "DIVERGED" in trials_csv and "loss became nan" in trials_csv


def searched_values(row: dict) -> tuple:
    return tuple(float(row[k]) for k in ("learning_rate", "temperature", "alpha"))


def by_searched_values(experiment_dir: Path) -> dict[tuple, dict]:
    """trials.csv rows keyed by their searched values (two runs give their trials different ids)."""
    with (experiment_dir / "trials.csv").open() as handle:
        return {searched_values(row): row for row in csv.DictReader(handle)}


def wait_for_line(path: Path, text: str, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.is_file() and text in path.read_text():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_kill_and_resume_give_the_uninterrupted_search(world, tmp_path):
    """One trial at a time (so both runs see the same order): ASHA, the seeded sampler and the
    trials are deterministic, so a search killed (driver and trials, SIGKILL) and resumed must end
    as the uninterrupted one: the same trials stopped at the same epochs, the same errored trial
    left ERROR, the same best, a study that agrees with trials.csv."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(search_raw(world, num_samples=4, search={"max_concurrent": 1, "max_failures": 0})))
    plan = [{"kind": "error", "epoch": 2, "times": 1}]   # the first trial to reach epoch 2 fails there

    def search(storage: Path, *flags: str, **popen) -> subprocess.Popen:
        fault = storage / "fault.json"
        if not fault.exists():
            storage.mkdir()
            fault.write_text(json.dumps(plan))
        env = {**os.environ, FAULT_FILE_ENV: str(fault), "PYTHONPATH": str(REPO)}
        return subprocess.Popen([sys.executable, "-m", "tune_kd.search", "--space", str(space), "--storage",
                                 str(storage), "--num-cpus", "2", "--no-dashboard", *flags], cwd=REPO, env=env,
                                text=True, **popen)

    reference = search(tmp_path / "reference", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    expected = by_searched_values(tmp_path / "reference" / "tiny-search")
    assert sorted(r["status"] for r in expected.values()).count("STOPPED_EARLY") >= 1   # ASHA had work to do
    assert [r["status"] for r in expected.values()].count("ERROR") == 1
    check_study_agrees(tmp_path / "reference" / "tiny-search")

    killed, experiment = tmp_path / "killed", tmp_path / "killed" / "tiny-search"
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        driver = search(killed, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        reached = wait_for_line(log, "search: 2/4 trials done", 300)
        time.sleep(2)
        os.killpg(driver.pid, signal.SIGKILL)                      # the driver and everything it started
        driver.wait(timeout=30)
    assert reached, log.read_text()[-3000:]
    before = epochs_by_trial(experiment)
    saved = {c: c.joinpath("model.safetensors").stat().st_mtime_ns for c in experiment.glob("trial_*/checkpoint_*")
             if checkpoint.is_complete(c)}

    resumed = search(killed, "--resume", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "search: 4/4 trials done" in out                         # the count went on from where it was
    got = by_searched_values(experiment)
    assert {k: (r["status"], r["epochs"]) for k, r in got.items()} == \
        {k: (r["status"], r["epochs"]) for k, r in expected.items()}
    after = epochs_by_trial(experiment)
    for trial, epochs in after.items():
        assert epochs == list(range(1, len(epochs) + 1)), (trial, epochs)   # no epoch run twice
    for path, mtime in saved.items():   # a trial that had ended before the kill was not run again
        trial = path.parent.name.removeprefix("trial_")
        if trial in after and before.get(trial) == after[trial]:
            assert path.joinpath("model.safetensors").stat().st_mtime_ns == mtime
    check_study_agrees(experiment)
    best = json.loads((experiment / "best.json").read_text())
    reference_best = json.loads((tmp_path / "reference" / "tiny-search" / "best.json").read_text())
    assert searched_values(best) == searched_values(reference_best)
    assert best["best_val_ce"] == pytest.approx(reference_best["best_val_ce"], rel=1e-4)   # resumed mid-trial, maybe
    assert json.loads((experiment / "best_student" / "tune_kd.json").read_text())["trial_id"] == best["trial_id"]
    # --retry-errored's study bookkeeping: tests/search/test_searcher.py::test_a_retried_errored_trial_reaches_the_study


@pytest.mark.slow
def test_bad_space_fails_before_ray_starts(tmp_path, world):
    raw = search_raw(world)
    raw["parameters"]["alpha"]["max"] = 1.5
    raw["search"]["num_samples"] = 0
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "tune_kd.search", "--space", str(space), "--storage",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "parameters.alpha.max: must be in [0, 1]" in proc.stderr
    assert "search.num_samples: must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_missing_paths_and_gpus_are_config_errors(world):
    from tune_kd.config.errors import ConfigError
    from tune_kd.search.prepare import check_paths
    from tune_kd.search.resources import check_gpus

    cfg = load_config(raw=search_raw(world, data={"path": "/nonexistent/train.jsonl"}, teacher={"path": "/no/teacher"},
                                     resources={"gpu_per_trial": 2}))
    with pytest.raises(ConfigError) as err:
        check_paths(cfg, "x.yaml")
    assert len(err.value.problems) == 2
    assert "x.yaml: data.path: /nonexistent/train.jsonl does not exist" in str(err.value)
    assert "teacher.path: /no/teacher does not exist" in str(err.value)
    with pytest.raises(ConfigError, match="resources.gpu_per_trial: 2 asked for, but this machine has 0 GPU"):
        check_gpus(cfg, 0, "x.yaml")


def test_resources_and_concurrency(world):
    from tune_kd.search.resources import concurrency, trial_resources

    cfg = load_config(raw=search_raw(world))
    resources = trial_resources(cfg, gpus=0)
    assert resources == {"cpu": 1.0, "gpu": 0, "workers": 1}
    assert concurrency(cfg, resources, cpus=2, gpus=0) == 2
    shared = load_config(raw=search_raw(world, resources={"gpu_per_trial": 0.25, "cpu_per_trial": 2}))
    assert concurrency(shared, trial_resources(shared, gpus=1), cpus=16, gpus=1) == 4
    ddp = load_config(raw=search_raw(world, resources={"gpu_per_trial": "auto", "workers_per_trial": 2}))
    assert trial_resources(ddp, gpus=8) == {"cpu": 1.0, "gpu": 1, "workers": 2}      # a whole GPU per worker
    assert concurrency(ddp, trial_resources(ddp, gpus=8), cpus=16, gpus=8) == 4
    with pytest.raises(UserError, match="one trial needs 2.01 CPUs .2 workers x cpu_per_trial 1 . its driver."):
        concurrency(ddp, trial_resources(ddp, gpus=0), cpus=2, gpus=0)


@pytest.mark.slow
def test_search_on_a_two_node_cluster(world, tmp_path):
    """ray start --head / ray start --address, simulated by ray.cluster_utils.Cluster: trials run on
    both nodes, results land in the shared storage and the export works."""
    import ray
    from ray.cluster_utils import Cluster

    from tune_kd.search import runner

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    try:
        cfg = load_config(raw=search_raw(world, num_samples=4, scheduler={"type": "none"}, train={"epochs": 1}))
        summary = runner.run_search(cfg, "test", storage=str(tmp_path), address=cluster.address)
        assert summary["parallel"] == 2
        nodes = set()
        for result in (tmp_path / "tiny-search").glob("trial_*/result.json"):
            nodes |= {json.loads(line)["node_id"] for line in result.read_text().splitlines() if line.strip()}
        assert nodes == {cluster.head_node.node_id, worker.node_id}
        assert len(summary["rows"]) == 4 and all(r["status"] == "COMPLETED" for r in summary["rows"])
        assert (tmp_path / "tiny-search" / "best_student" / "model.safetensors").is_file()
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_progressive_stages_chain_teacher_to_medium_to_small(world, tmp_path):
    raw = search_raw(world, num_samples=2, scheduler={"type": "none"}, train={"epochs": 1})
    raw["name"] = "chain"
    raw["stages"] = [{"name": "medium", "student": {"arch": dict(TINY_ARCH, hidden_size=48, num_attention_heads=2)}},
                     {"name": "small", "student": {"arch": dict(TINY_ARCH, hidden_size=16)},
                      "train": {"learning_rate": 5e-3}}]
    space = tmp_path / "chain.yaml"
    space.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "tune_kd.search", "--space", str(space), "--storage", str(tmp_path),
                           "--num-cpus", "2", "--no-dashboard"], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "chain"
    stages = json.loads((root / "stages.json").read_text())
    assert [s["stage"] for s in stages] == ["medium", "small"]
    assert stages[0]["teacher"] == world["teacher"]
    assert stages[1]["teacher"] == str(root / "medium" / "best_student")          # medium's export teaches small
    small = json.loads((root / "small" / "experiment.json").read_text())["config"]
    assert small["teacher"]["path"] == str(root / "medium" / "best_student")
    assert small["train"]["learning_rate"] == 5e-3 and small["train"]["epochs"] == 1   # merged over the file's
    for stage, width in (("medium", 48), ("small", 16)):
        config = json.loads((root / stage / "best_student" / "config.json").read_text())
        assert config["hidden_size"] == width
        assert len((root / stage / "trials.csv").read_text().splitlines()) == 3
    rerun = subprocess.run([sys.executable, "-m", "tune_kd.search", "--space", str(space), "--storage", str(tmp_path),
                            "--resume", "--no-dashboard"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and rerun.stderr.count("already done") == 2, rerun.stderr[-2000:]


@pytest.mark.slow
def test_data_parallel_trials_through_ray_train(world, tmp_path, monkeypatch):
    """workers_per_trial 2: each trial trains with DDP on 2 gloo workers (Ray Train's TorchTrainer);
    rank 0's metrics and checkpoints reach Tune, the export works, and a trial that fails resumes."""
    from tune_kd.search import runner

    fault = tmp_path / "fault.json"
    fault.write_text(json.dumps([{"kind": "error", "epoch": 2, "times": 1}]))
    monkeypatch.setenv(FAULT_FILE_ENV, str(fault))
    cfg = load_config(raw=search_raw(world, num_samples=1, scheduler={"type": "none"}, train={"epochs": 2},
                                     resources={"cpu_per_trial": 1, "workers_per_trial": 2}))
    # 2 workers x 1 CPU plus the trial's driver actor: Ray gets 3 logical CPUs (the machine has 2 cores)
    summary = runner.run_search(cfg, "test", storage=str(tmp_path), num_cpus=3, dashboard_host=None)
    experiment = tmp_path / "tiny-search"
    rows = [json.loads(line) for result in experiment.glob("trial_*/result.json")
            for line in result.read_text().splitlines() if line.strip()]
    assert rows and all(r["workers"] == 2 for r in rows)                   # DDP over 2 workers
    assert all(r["checkpoint_path"].startswith(str(experiment)) for r in rows)
    assert len(summary["rows"]) == 1 and all(r["status"] == "COMPLETED" for r in summary["rows"])
    assert json.loads(fault.read_text())[0]["times"] == 0            # one trial crashed at epoch 2 ...
    assert all(epochs == [1, 2] for epochs in epochs_by_trial(experiment).values())   # ... and resumed, no repeat
    assert (experiment / "best_student" / "model.safetensors").is_file()
