"""Every bench script's --smoke run: `python bench/<script> --smoke` from the repository root exits 0
and prints the figure lines the script exists for, with plausible values, and writes nothing under
results/. Nothing else runs the bench scripts, so without this a moved tune_kd function breaks one
unseen (bench/served_teacher.py stopped at its first line after prepare_teacher_rows moved).

Each run is a subprocess (the scripts are programs: their argument parsing, sys.path set-up and
module globals are part of what must keep working) at toy sizes, seconds each; none needs
../shared or a GPU."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
TIMEOUT_S = 600     # a hung script fails here; a smoke run takes seconds on an idle 2-core machine


def number(text: str) -> float:
    return float(text.rstrip("x%"))


def finite_positive(*values: str) -> bool:
    return all(math.isfinite(number(v)) and number(v) > 0 for v in values)


# script -> [(a regular expression one stdout line must match, a check of its groups)]: the figure
# lines the script exists to print, and what makes their values plausible at toy sizes
SMOKES: dict[str, list[tuple[str, object]]] = {
    "asha_distillation_bias.py": [
        # per table, the share of the best configs ASHA stopped early (n/a where a group has none in the top)
        (r"on table minimind: top 10% stopped early (?:n/a|[\d.]+%) at alpha < \S+ \(\d+ configs\) against "
         r"([\d.]+)% at alpha >= \S+ \((\d+)\)", lambda p, n: 0 <= number(p) <= 100 and int(n) > 0),
        # the markdown table for docs/search.md: trial-epochs per search, the share of configs stopped early
        (r"^\| default \| default: grace 1, factor 2 \| (\d+\.\d) \| ([\d.]+)% \|",
         lambda epochs, stopped: number(epochs) > 0 and 0 <= number(stopped) <= 100)],
    "cross_tokenizer.py": [
        # the gain ratio per cross-tokenizer loss (nan where same-tokenizer KD gains nothing, as an
        # untrained toy world's may), the numerals measurement and the coverage audit of the pair
        (r"^pkl: cross/same-tokenizer KD gain: (\S+) \(cross gain ([+-]\d+\.\d+)",
         lambda ratio, gain: not math.isinf(number(ratio)) and math.isfinite(number(gain))),
        (r"^numerals: minimind \(\d+ ids\): (\d+) vocabulary entries are multi-digit numerals.* (\S+) tokens per digit",
         lambda n, per_digit: int(n) > 0 and 0 < number(per_digit) < 1),
        (r"^numerals: qwen \(\d+ ids\): 0 vocabulary entries .* 1\.000 tokens per digit", None),
        (r"^cross-vocab: \d+ of \d+ student tokens spelled as the teacher's.*recommended loss (pkl|hkl|gold_hybrid)", None),
        (r"^\| gold_hybrid \| gold_hybrid \| qwen \| .* \| (\d+\.\d+) ± \S+ \| (\d\.\d+) ± ",
         lambda ce, acc: finite_positive(ce) and 0 <= number(acc) <= 1)],
    "data_fraction.py": [
        (r"demo: KD-SFT gap at 25%: ([+-]\d+\.\d+) \(seed std", lambda gap: abs(number(gap)) < 5),
        (r"^\| demo \| 25% \| (\d+\.\d+) ± \S+ \| (\d+\.\d+) ± ", finite_positive)],   # KD and SFT val_ce
    "data_scale.py": [
        (r"^prepare\s+200\s+\S+\s+\S+\s+\S+\s+(\d+)\s+(\S+)\s+(\d+)", finite_positive)],  # conv/s, RSS, tokens
    "docstring_world.py": [
        (r'"teacher_metrics": \{', None),
        (r'"val_ce": (\d+\.\d+)', finite_positive)],
    "gpu_search.py": [
        (r"max_concurrent (\d+), trials running at the same time \(peak\): (\d+)",
         lambda allowed, peak: 1 <= int(peak) <= int(allowed)),
        (r"(\d+) trials x 1 epochs: wall", lambda n: int(n) >= 1)],
    "on_policy_cost.py": [
        (r"on-policy / off-policy step time: (\S+) \(cached teacher\), (\S+) \(live teacher\)", finite_positive)],
    "on_policy_fraction.py": [
        (r"^\| on_policy_fraction 0\.5 \| (\d\.\d+) \| (\d+\.\d+) \| (\d+\.\d+) \| (\d\.\d+) \|",
         lambda acc, gen_ce, ce, acc2: 0 <= number(acc) <= 1 and finite_positive(gen_ce, ce)),
        (r"^\| plain SFT \(alpha 1\) \|", None)],
    "on_policy_warm_start.py": [
        (r"^\| warm-started on-policy \| 0 \| (\d\.\d+) \| (\d+\.\d+) \| (\d+\.\d+) \|",
         lambda acc, gen_ce, ce: 0 <= number(acc) <= 1 and finite_positive(gen_ce, ce)),
        # until the warm-up ends the warm arm trains exactly the off-policy arm's batches
        (r"^warm-up check: at epoch 1, the warm-up's end, warm-started on-policy has the off-policy arm's val_ce "
         r"exactly on 1/1 seeds", None),
        (r"^warm-started on-policy vs off-policy: val_gen_acc [+-]\d", None)],
    "real_vocab_world.py": [
        (r"world: teacher val_ce (\d+\.\d+)", finite_positive),
        (r"experiment: \S+kd\.yaml loads: real-vocab-world, 1 trial", None),
        (r"reloaded Qwen2ForCausalLM with 512 vocab rows", None)],
    "sampler_proxy.py": [   # the stand-in's optimum is 0.9, give or take its noise
        (r"^\| tpe \(tune_kd: .*\) \| 4 \| (\d\.\d+) \|", lambda best: 0.85 < number(best) < 3)],
    "search_efficiency.py": [
        (r"# tpe\+asha: config loads: optuna, scheduler asha", None),
        # ASHA (grace 1, factor 2) stops the poor curves early, and the best value is the best curve's end
        (r"replayed random\+asha on 4 fixed curves: (\d+) trial-epochs of 12, best (\S+)",
         lambda spent, best: 4 <= int(spent) < 12 and number(best) == 1.2)],
    "search_replay.py": [
        (r"default/random trial-epochs to random's final best: (\S+) \(median of 1 seeds, IQR \S+\), table minimind",
         finite_positive)],
    "served_teacher.py": [
        # at toy size the teachers' memory is within the processes' noise: the ratio of two
        # differences can take any sign, so only a number is asked of it
        (r"served/local teacher memory \(2 trials\): (\S+)", lambda ratio: math.isfinite(number(ratio))),
        (r"served/local trial step time: (\S+)", finite_positive),
        (r"server batch occupancy: (\S+) requests per teacher forward", lambda n: number(n) >= 1),
        (r"on-policy / cached off-policy batch: (\S+) \(served teacher\), (\S+) \(own teacher\)", finite_positive)],
    "shape_front.py": [
        (r"search: not run under --smoke \(its config loads: shape-search-seed0, objectives "
         r"\['val_ce', 'student_params'\]\)", None),
        (r"^  grid: 32x1 ([\d,]+) (\d+\.\d+).*, 64x1 ([\d,]+) (\d+\.\d+)",   # the wider student is the larger
         lambda p32, v32, p64, v64: int(p32.replace(",", "")) < int(p64.replace(",", "")) and finite_positive(v32, v64)),
        (r"ASHA within factor-2 size brackets: stops (\S+) of the grid's", lambda n: number(n) >= 0)],
    "step_throughput.py": [
        (r"ratio tune_kd/seed \(real tokens/s\): (\S+)x", finite_positive),
        (r"ratio cached/tune_kd \(real tokens/s\): (\S+)x", finite_positive)],
    "student_init_speed.py": [
        (r"teacher-init epochs to random-init's best val_ce: (\S+) of (\S+) \(ratio", None)],
    "teacher_cache_fidelity.py": [   # the full row (k = V = 103) is the live teacher: exact
        (r"^\s+103\s+float32\s+\d+\s+0\.000%\s+\S+\s+0\.000%\s+\S+\s+0\.000%", None),
        (r"^\s+64\s+float16\s+\d+\s+(\d+\.\d+)%", lambda error: number(error) > 0),
        (r"top_k auto on this world \(T searched in \[1, 4\]", None)],
    "search_overhead.py": [
        # the table's closing row: the trials' training steps as a share of their wall time
        (r"\*\*trials: training steps \(forward, backward, optimizer\)\*\* \| \S+ \| \*\*(\d+\.\d)% of the trials",
         lambda share: 0 < number(share) <= 100)],
    "vocab_memory.py": [
        (r"fused/full peak memory at V=8192: (\S+)", finite_positive),
        (r"fused/full step time at V=8192: (\S+)", finite_positive),
        # the two paths compute the same loss: a fused head that changed it fails here
        (r"fused vs full loss, relative difference at V=8192: (\S+)", lambda d: number(d) < 1e-3)],
}

# scripts whose smoke test lives elsewhere: script -> where
ELSEWHERE = {
    "gpu_check_table.py": "tests/search/test_gpu_check_table.py",
    "vs_trl.py": "tests/bench/test_vs_trl_smoke.py",     # written with the script, on another branch
}


def results_entries() -> set[str]:
    return {p.name for p in (REPO / "results").iterdir()} if (REPO / "results").is_dir() else set()


@pytest.mark.parametrize("script", sorted(SMOKES))
def test_the_bench_script_runs_its_smoke_setting_and_prints_its_figures(script):
    before = results_entries()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, f"bench/{script}", "--smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    lines = done.stdout.splitlines()
    for pattern, check in SMOKES[script]:
        found = next((m for m in map(re.compile(pattern).search, lines) if m), None)
        assert found, f"no line matches {pattern!r} in:\n{done.stdout[-3000:]}"
        assert check is None or check(*found.groups()), f"implausible: {found.group(0)!r}"
    assert results_entries() == before, "a smoke run wrote under results/"


def test_every_bench_script_has_a_smoke_run():
    """A new bench script needs an entry here (or in ELSEWHERE, naming its own smoke test); bench/_*.py
    are helpers, not scripts."""
    scripts = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")}
    assert sorted(scripts - set(SMOKES) - set(ELSEWHERE)) == []
    assert sorted(set(SMOKES) - scripts) == [], "SMOKES names a script that is gone"
    assert not set(SMOKES) & set(ELSEWHERE)
    for script, where in ELSEWHERE.items():
        if where.startswith("tests/") and (BENCH / script).exists():
            assert (REPO / where).is_file(), f"{script}'s smoke test {where} is missing"
