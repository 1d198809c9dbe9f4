"""Does ASHA stop distillation early? Distilled students may start slower and end better; an early
stop at the first rung would then cost the search its best heavily distilled configs. Measured on the
recorded learning-curve tables (bench/curves/), per alpha (the CE weight: alpha 1 is plain SFT, a low
alpha distils heavily).

    python bench/asha_distillation_bias.py [--tables default minimind] [--searches 1000]
                                           [--processes 2] [--out results/asha-bias]
    python bench/asha_distillation_bias.py --smoke   # seconds: 2 searches per table and arm, one process,
                                                     # written to a scratch folder (tests/bench)

Per table:

    final       a config's value at the last recorded epoch, mean over its recorded seeds
    top         the best TOP_SHARE of the configs by final value (rounded up): the configs a search
                should not stop
    replayed    Ray's ASHA as the replay backend drives it (bench/curves/replay.py: its simulated
                clock, its RayDriver, two trials at a time): --searches random searches of
                search.num_samples trials, each a random draw of the recorded configs in a random
                order, each trial answered by one recorded seed's curve (the seed replay() picks).
                A trial is stopped early when ASHA ends it before the last epoch.
                P(stopped) of a group = its configs' stops / their appearances over all searches.
    rung rule   the synchronous reading of the same rungs on the seeds' mean curves: at each rung below
                max_t a config goes on when its value is within the best 1/reduction_factor of the
                configs still running (Ray's cutoff, np.nanpercentile), else it is stopped there

Groups: alpha < LOW_ALPHA (distillation-weighted) against alpha >= LOW_ALPHA, and alpha tertiles.
The top 10% may hold too few low-alpha configs to tell, so the two groups are also compared at equal
final standing over the best MATCHED_SHARE (standing_matched: per decile of final rank, low-alpha
stops against those expected at the high-alpha rate of the same decile, with a 90% interval from a
bootstrap over the configs); comparing each group's own best tenth instead would set worse-ending
configs against better ones, and ASHA rightly stops those more. The premise is printed per group too:
its share of the top and its median climb from first-epoch rank to final rank. Each arm is ASHA at the shipped settings (SchedulerConfig's grace_period and reduction_factor,
max_t = the table's epochs) or an alternative (ALTERNATIVES).

Verdict (per table and arm, for either comparison): biased against distillation when the low-alpha
configs are stopped at least BIAS_RATIO x as often as the high-alpha ones and the excess rate times
the number of low-alpha configs compared is at least MIN_EXCESS configs, on at least MIN_CONFIGS
low-alpha configs (fewer: "too few to tell").

Prints every figure, then one markdown table of both tables for docs/search.md ("Does the search
search well?"), and writes <out>/asha-bias.json. Nothing is read from earlier results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "curves")]

from replay import Arm, Table, replay  # noqa: E402

from tune_kd.config.experiment import SchedulerConfig, SearchConfig

TOP_SHARE = 0.1
LOW_ALPHA = 0.5
TERTILES = (0.0, 1 / 3, 2 / 3, 1.0)
BIAS_RATIO = 1.5      # issue 35's threshold: low-alpha configs stopped at least 1.5x as often ...
MIN_EXCESS = 0.5      # ... by at least half a config's worth (a ratio on rare stops can be large and empty)
MIN_CONFIGS = 3       # fewer low-alpha configs than this: one or two configs' curves would be the verdict
MATCHED_SHARE = 0.3   # the standing-matched comparison's reach: the best three deciles by final value
RESAMPLES = 2000      # bootstrap over configs: the matched ratio's spread comes from a few curves, not the searches

# random search, as the replay's random + ASHA arm: ASHA's decisions see only the values, so the
# configs a TPE would propose change who competes, not the rule under test. Every arm replays the same
# draws and orders (one_search seeds them by the search's number): the arms differ in the rule alone.
_shipped = SchedulerConfig()
DEFAULT = Arm(f"default: grace {_shipped.grace_period}, factor {_shipped.reduction_factor}", searcher="random",
              scheduler="asha", num_samples=SearchConfig().num_samples, grace=_shipped.grace_period,
              reduction=_shipped.reduction_factor, evaluate_first=False)
ALTERNATIVES = [
    dataclasses.replace(DEFAULT, name="grace 2, factor 2", grace=2, reduction=2),
    dataclasses.replace(DEFAULT, name="grace 1, factor 3", grace=1, reduction=3),
    dataclasses.replace(DEFAULT, name="grace 1, factor 2, 3 brackets", grace=1, reduction=2, brackets=3),
]


# ----------------------------------------------------------------------------------------------
# The recorded configs, fed through the replay backend
# ----------------------------------------------------------------------------------------------

class WatchedCurve:
    """A recorded run that remembers how many epochs the replay read: replay() reads epoch e of a
    trial (index e - 1) only when the trial reaches it, so the furthest read is where it ended."""

    def __init__(self, run: np.ndarray):
        self.run, self.reached = run, 0

    def __getitem__(self, index: int) -> float:
        self.reached = max(self.reached, index + 1)
        return self.run[index]


class RecordedOrder:
    """Answers for replay(): the n-th proposed trial is the n-th config of `order`, its curve the
    recorded seed replay() picks. The proposal itself is ignored: the searcher is random, and a
    random search that happened to draw these configs is the search replayed."""

    def __init__(self, table: Table, order: np.ndarray):
        self.table, self.order = table, list(order)
        self.handed: list[tuple[int, WatchedCurve]] = []

    def curve(self, config: dict, pick: int) -> WatchedCurve:
        index = self.order[len(self.handed)]
        watched = WatchedCurve(self.table.runs[index, pick % self.table.seeds])
        self.handed.append((index, watched))
        return watched


_tables: dict[str, Table] = {}   # name -> table, loaded before the workers fork


def one_search(job: tuple[str, Arm, int]) -> tuple[str, str, list[tuple[int, int]]]:
    """One replayed search: (config, epochs it ran) per trial."""
    name, arm, seed = job
    table = _tables[name]
    order = np.random.default_rng(seed).permutation(len(table.configs))[:arm.num_samples]
    answers = RecordedOrder(table, order)
    reports = replay(answers, arm, seed)
    ran = [(int(index), watched.reached) for index, watched in answers.handed]
    # every report is one epoch read: a replay that read a curve another way would fail here, not skew
    assert sum(epochs for _, epochs in ran) == len(reports), "replay() read the curves out of epoch order"
    return name, arm.name, ran


def replayed_stops(runs: list[list[tuple[int, int]]], configs: int,
                   epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per config: searches it appeared in, and in how many ASHA stopped it before `epochs`."""
    seen, stopped = np.zeros(configs, dtype=int), np.zeros(configs, dtype=int)
    for ran in runs:
        for index, reached in ran:
            seen[index] += 1
            stopped[index] += reached < epochs
    return seen, stopped


# ----------------------------------------------------------------------------------------------
# The synchronous rung rule on the mean curves
# ----------------------------------------------------------------------------------------------

def rung_milestones(arm: Arm, epochs: int) -> list[tuple[list[int], float]]:
    """Each bracket's rungs below max_t, ascending, as Ray's ASHA builds them (a trial reaching max_t
    is ended as finished, not judged), with the chance that a trial joins it (Ray's draw)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler

    scheduler = AsyncHyperBandScheduler(time_attr="epoch", metric="value", mode="min", max_t=epochs,
                                        grace_period=arm.grace, reduction_factor=arm.reduction,
                                        brackets=arm.brackets)
    sizes = np.array([len(bracket._rungs) for bracket in scheduler._brackets], dtype=float)
    chances = np.e ** (sizes - sizes.max())   # AsyncHyperBandScheduler.on_trial_add's weights
    return [(sorted(int(milestone) for milestone, _ in bracket._rungs if milestone < epochs), float(chance))
            for bracket, chance in zip(scheduler._brackets, chances / chances.sum())]


def rung_rule_stops(mean_curves: np.ndarray, milestones: list[int], reduction: int) -> np.ndarray:
    """True where a config is stopped: at each rung, worse than Ray's cutoff (the 1/reduction
    percentile of the values of the configs that reached it) among those still running."""
    running = np.ones(len(mean_curves), dtype=bool)
    for milestone in milestones:
        values = mean_curves[running, milestone - 1]
        cutoff = np.nanpercentile(values, 100 / reduction)
        running &= mean_curves[:, milestone - 1] <= cutoff
    return ~running


# ----------------------------------------------------------------------------------------------
# Groups and figures
# ----------------------------------------------------------------------------------------------

def ranks(values: np.ndarray) -> np.ndarray:
    """0 for the lowest (best) value, ties in config order."""
    return np.argsort(np.argsort(values, kind="stable"), kind="stable")


def top_configs(final: np.ndarray) -> np.ndarray:
    """Mask of the best TOP_SHARE of the configs (rounded up) by final value."""
    return ranks(final) < math.ceil(TOP_SHARE * len(final))


def alpha_groups(alpha: np.ndarray) -> dict[str, np.ndarray]:
    """The low/high split first (the verdict's pair), then the tertiles."""
    groups = {f"alpha < {LOW_ALPHA}": alpha < LOW_ALPHA, f"alpha >= {LOW_ALPHA}": alpha >= LOW_ALPHA}
    for low, high in zip(TERTILES, TERTILES[1:]):
        groups[f"alpha {low:.2f}-{high:.2f}"] = (alpha >= low) & ((alpha < high) if high < 1 else (alpha <= high))
    return groups


def rate(mask: np.ndarray, seen: np.ndarray, stopped: np.ndarray) -> dict:
    """P(stopped) over the appearances of the masked configs, with the counts behind it."""
    appearances, stops = int(seen[mask].sum()), int(stopped[mask].sum())
    return {"configs": int(mask.sum()), "appearances": appearances, "stops": stops,
            "p": stops / appearances if appearances else float("nan")}


def verdict(low: dict, high_rate: float) -> dict:
    """Biased when the low-alpha configs are stopped BIAS_RATIO x as often as high-alpha ones standing
    as well, by at least MIN_EXCESS configs' worth (the excess rate times the low-alpha configs)."""
    ratio = low["p"] / high_rate if high_rate > 0 else (float("inf") if low["p"] > 0 else 1.0)
    excess = (low["p"] - high_rate) * low["configs"]
    if high_rate != high_rate:   # NaN: no high-alpha config stands where the low-alpha ones do
        reading = "no high-alpha configs to compare with"
    elif low["configs"] < MIN_CONFIGS:
        reading = f"too few low-alpha configs ({low['configs']} < {MIN_CONFIGS}) to tell"
    elif ratio >= BIAS_RATIO and excess >= MIN_EXCESS:
        reading = "biased against distillation"
    else:
        reading = "not biased against distillation"
    return {"ratio": ratio, "excess_configs": excess, "reading": reading}


def standing_matched(final: np.ndarray, low: np.ndarray, seen: np.ndarray, stopped: np.ndarray) -> dict:
    """Low- against high-alpha configs at equal final standing, over the best MATCHED_SHARE: per decile
    of final rank, each group's P(stopped); then the low-alpha stops observed against those expected
    had each low-alpha config been stopped at its decile's high-alpha rate. Unlike each group's own
    best, this does not set worse-ending configs against better ones."""
    decile = ranks(final) * 10 // len(final)
    deciles, configs, observed, expected, appearances = [], 0, 0, 0.0, 0
    for d in range(math.ceil(MATCHED_SHARE * 10)):
        in_low, in_high = (decile == d) & low, (decile == d) & ~low
        low_rate, high_rate = rate(in_low, seen, stopped), rate(in_high, seen, stopped)
        deciles.append({"decile": d + 1, "low": low_rate, "high": high_rate})
        if low_rate["appearances"] and high_rate["appearances"]:   # a decile of one group alone compares nothing
            configs += low_rate["configs"]
            observed += low_rate["stops"]
            expected += low_rate["appearances"] * high_rate["p"]
            appearances += low_rate["appearances"]
    pooled = {"configs": configs, "appearances": appearances, "stops": observed,
              "p": observed / appearances if appearances else float("nan")}
    return {"deciles": deciles, "observed": observed, "expected": expected, "low": pooled,
            "interval": matched_interval(decile, low, seen, stopped),
            "verdict": verdict(pooled, expected / appearances if appearances else float("nan"))}


def matched_interval(decile: np.ndarray, low: np.ndarray, seen: np.ndarray, stopped: np.ndarray) -> list[float]:
    """The 5th and 95th percentiles of the matched ratio (observed / expected low-alpha stops) over
    RESAMPLES bootstrap draws of the configs, each group within each decile drawn with replacement:
    thousands of searches replay the same few configs, so their curves, not the searches, set the spread."""
    rng = np.random.default_rng(0)
    cells = [(np.nonzero((decile == d) & low)[0], np.nonzero((decile == d) & ~low)[0])
             for d in range(math.ceil(MATCHED_SHARE * 10))]
    cells = [(lows, highs) for lows, highs in cells if lows.size and highs.size]
    ratios = []
    for _ in range(RESAMPLES):
        observed = expected = 0.0
        for lows, highs in cells:
            drawn_low, drawn_high = rng.choice(lows, lows.size), rng.choice(highs, highs.size)
            observed += stopped[drawn_low].sum()
            expected += seen[drawn_low].sum() * stopped[drawn_high].sum() / max(1, seen[drawn_high].sum())
        if expected > 0:
            ratios.append(observed / expected)
    return [float(q) for q in np.percentile(ratios, [5, 95])] if ratios else [float("nan")] * 2


def premise(table: Table, final: np.ndarray, alpha: np.ndarray) -> dict:
    """Do low-alpha configs start slower and end better? Per group: its share of the top, and the
    median climb from its rank at the first epoch to its final rank (positive: it climbs)."""
    climb = ranks(table.runs.mean(axis=1)[:, 0]) - ranks(final)
    top = top_configs(final)
    out = {}
    for name, mask in list(alpha_groups(alpha).items())[:2]:
        out[name] = {"configs": int(mask.sum()), "in_top": int((mask & top).sum()),
                     "median_climb": float(np.median(climb[mask])),
                     "median_final": float(np.median(final[mask])), "best_final": float(final[mask].min())}
    return out


def measure(table: Table, runs: dict[str, list], arms: list[Arm]) -> dict:
    """Every figure of one table: per arm, P(stopped) of the top (all, per alpha group), replayed and
    by the rung rule, the standing-matched comparison, the trial-epochs a search spends, the verdicts."""
    mean = table.runs.mean(axis=1)
    final = mean[:, -1]
    alpha = np.array([config["alpha"] for config in table.configs], dtype=float)
    top = top_configs(final)
    groups = alpha_groups(alpha)
    low_name, high_name = list(groups)[:2]
    out = {"configs": len(final), "top": int(top.sum()), "top_cutoff": float(final[top].max()),
           "premise": premise(table, final, alpha), "arms": {}}
    for arm in arms:
        seen, stopped = replayed_stops(runs[arm.name], len(final), table.epochs)
        # brackets > 1: a trial joins one bracket, so a config's chance of a stop is each bracket's
        # rule weighted by the chance of joining it (each bracket judged on all configs)
        rule_p = sum(chance * rung_rule_stops(mean, milestones, arm.reduction).astype(float)
                     for milestones, chance in rung_milestones(arm, table.epochs))
        spent = [sum(epochs for _, epochs in ran) for ran in runs[arm.name]]
        row = {"settings": arm.settings(), "all": rate(np.ones(len(final), dtype=bool), seen, stopped),
               "top": rate(top, seen, stopped), "groups": {}, "per_config": [],
               "trial_epochs_per_search": float(np.mean(spent))}
        for name, mask in groups.items():
            rule_top = float(rule_p[top & mask].mean()) if (top & mask).any() else float("nan")
            row["groups"][name] = {"top": rate(top & mask, seen, stopped), "all": rate(mask, seen, stopped),
                                   "rule_top": rule_top}
        row["verdict"] = verdict(row["groups"][low_name]["top"], row["groups"][high_name]["top"]["p"])
        row["matched"] = standing_matched(final, groups[low_name], seen, stopped)
        for index in np.nonzero(top)[0][np.argsort(final[top], kind="stable")]:
            row["per_config"].append({"config": int(index), "alpha": float(alpha[index]),
                                      "final": float(final[index]), "seen": int(seen[index]),
                                      "p": float(stopped[index] / seen[index]) if seen[index] else float("nan"),
                                      "rule": float(rule_p[index])})
        out["arms"][arm.name] = row
    return out


def overall(row: dict) -> str:
    """One reading per arm: biased if either comparison says so, else the standing-matched one's
    (the top 10% alone holds too few low-alpha configs on the recorded tables to overrule it)."""
    readings = (row["verdict"]["reading"], row["matched"]["verdict"]["reading"])
    return "biased against distillation" if "biased against distillation" in readings else readings[1]


def pct(value: float) -> str:
    return "n/a" if value != value else f"{value:.1%}"


def report(name: str, table: Table, summary: dict, searches: int) -> list[str]:
    """The printed figures of one table."""
    top_name = f"top {TOP_SHARE:.0%}"
    lines = [f"\ntable {name}: {summary['configs']} configs x {table.seeds} seeds x {table.epochs} epochs; "
             f"{top_name}: {summary['top']} configs (final {table.metric} <= {summary['top_cutoff']:.4f})"]
    for group, row in summary["premise"].items():
        lines.append(f"  {group}: {row['configs']} configs, {row['in_top']} in the {top_name}; median final "
                     f"{row['median_final']:.4f}, best {row['best_final']:.4f}; median climb from first-epoch "
                     f"rank to final rank {row['median_climb']:+.0f}")
    for arm, row in summary["arms"].items():
        every, top = row["all"], row["top"]
        lines += [f"  [{arm}] ({row['settings']}; {searches} searches, "
                  f"{row['trial_epochs_per_search']:.1f} trial-epochs per search)",
                  f"    P(stopped early): every config {pct(every['p'])}; {top_name} {pct(top['p'])} "
                  f"({top['stops']}/{top['appearances']} appearances of {top['configs']} configs)"]
        for group, g in row["groups"].items():
            lines.append(f"    {group:>16}: P(stopped | {top_name}) {pct(g['top']['p']):>5} "
                         f"({g['top']['stops']}/{g['top']['appearances']} appearances of {g['top']['configs']} "
                         f"configs; rung rule {pct(g['rule_top'])}) | P(stopped | any of {g['all']['configs']}) "
                         f"{pct(g['all']['p'])}")
        matched = row["matched"]
        cells = [f"decile {d['decile']}: {pct(d['low']['p'])} of {d['low']['configs']} vs "
                 f"{pct(d['high']['p'])} of {d['high']['configs']}" for d in matched["deciles"]]
        v, m = row["verdict"], matched["verdict"]
        lines += ["    at equal final standing, P(stopped) low vs high alpha: " + "; ".join(cells),
                  f"    low/high alpha, {top_name}: ratio {v['ratio']:.2f}, excess {v['excess_configs']:+.2f} "
                  f"configs: {v['reading']}",
                  f"    low/high alpha, best {MATCHED_SHARE:.0%} at equal standing: low-alpha stops "
                  f"{matched['observed']} observed, {matched['expected']:.1f} expected at the high-alpha rate: "
                  f"ratio {m['ratio']:.2f} (90% over configs {matched['interval'][0]:.2f}-"
                  f"{matched['interval'][1]:.2f}), "
                  f"excess {m['excess_configs']:+.2f} configs: {m['reading']}",
                  f"    reading: {overall(row)}"]
    names = list(summary["arms"])
    lines.append(f"  the {top_name}, best first: P(stopped) replayed (rung rule) per arm: " + " | ".join(names))
    for k, entry in enumerate(summary["arms"][names[0]]["per_config"]):
        cells = [f"{pct(summary['arms'][n]['per_config'][k]['p']):>5} "
                 f"({pct(summary['arms'][n]['per_config'][k]['rule'])})" for n in names]
        lines.append(f"    config {entry['config']:3d} alpha {entry['alpha']:.2f} final {entry['final']:.4f} "
                     f"(in {entry['seen']} searches): " + "  ".join(cells))
    return lines


def markdown(summaries: dict[str, dict]) -> str:
    """One row per table and arm: the figures docs/search.md quotes."""
    top_name = f"top {TOP_SHARE:.0%}"
    lines = [f"| table | ASHA | trial-epochs per search | stopped early: every config | {top_name} "
             f"| {top_name}, alpha < {LOW_ALPHA} | {top_name}, alpha >= {LOW_ALPHA} "
             f"| best {MATCHED_SHARE:.0%}, alpha < {LOW_ALPHA}: stops / expected at equal standing (90%) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, summary in summaries.items():
        for arm, row in summary["arms"].items():
            low, high = (row["groups"][group]["top"] for group in list(row["groups"])[:2])
            matched = row["matched"]
            lines.append(f"| {name} | {arm} | {row['trial_epochs_per_search']:.1f} | {pct(row['all']['p'])} "
                         f"| {pct(row['top']['p'])} "
                         f"| {pct(low['p'])} ({low['stops']}/{low['appearances']}, {low['configs']} configs) "
                         f"| {pct(high['p'])} ({high['stops']}/{high['appearances']}, {high['configs']} configs) "
                         f"| {matched['observed']} / {matched['expected']:.0f} = {matched['verdict']['ratio']:.2f} "
                         f"({matched['interval'][0]:.2f}-{matched['interval'][1]:.2f}; {matched['low']['configs']} "
                         f"configs) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", nargs="+", default=["default", "minimind"])
    parser.add_argument("--curves", default=str(ROOT / "bench" / "curves"), help="where the tables are")
    parser.add_argument("--searches", type=int, default=1000, help="replayed searches per table and arm")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results" / "asha-bias"))
    parser.add_argument("--smoke", action="store_true", help="seconds: --searches 2 --processes 1, --out a scratch "
                        "folder unless given")
    args = parser.parse_args(argv)
    if args.smoke:
        import _smoke

        args.searches, args.processes = 2, 1
        if args.out == parser.get_default("out"):
            args.out = str(_smoke.scratch("asha-bias"))
    started = time.perf_counter()
    for name in args.tables:
        path = Path(args.curves) / f"{name}.csv"
        if not path.is_file():
            print(f"error: {path} does not exist (record it: python bench/curves/record.py --table {name})",
                  file=sys.stderr)
            return 2
        _tables[name] = Table.load(path)
    smallest = min(len(table.configs) for table in _tables.values())   # a search draws without repeats
    arms = [dataclasses.replace(arm, num_samples=min(arm.num_samples, smallest)) for arm in [DEFAULT, *ALTERNATIVES]]
    jobs = [(name, arm, seed) for name in _tables for arm in arms for seed in range(args.searches)]
    with multiprocessing.get_context("fork").Pool(args.processes) as pool:
        done = pool.map(one_search, jobs, chunksize=50)
    runs: dict = {name: {} for name in _tables}
    for name, arm, ran in done:
        runs[name].setdefault(arm, []).append(ran)
    summaries = {name: measure(table, runs[name], arms) for name, table in _tables.items()}
    for name, summary in summaries.items():
        print("\n".join(report(name, _tables[name], summary, args.searches)))
    print("\n" + markdown(summaries))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "asha-bias.json").write_text(json.dumps({"searches": args.searches, "summaries": summaries}, indent=1))
    print(f"\n{len(jobs)} replayed searches ({args.processes} process{'es' if args.processes != 1 else ''}) in {time.perf_counter() - started:.1f} s; "
          f"{out / 'asha-bias.json'}")
    for name, summary in summaries.items():
        row = summary["arms"][DEFAULT.name]
        low, high = (row["groups"][group]["top"] for group in list(row["groups"])[:2])
        print(f"default ASHA ({DEFAULT.name}) on table {name}: top {TOP_SHARE:.0%} stopped early "
              f"{pct(low['p'])} at alpha < {LOW_ALPHA} ({low['configs']} configs) against {pct(high['p'])} at "
              f"alpha >= {LOW_ALPHA} ({high['configs']}); best {MATCHED_SHARE:.0%} at equal standing: low/high "
              f"{row['matched']['verdict']['ratio']:.2f} ({row['matched']['interval'][0]:.2f}-"
              f"{row['matched']['interval'][1]:.2f}): {overall(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
