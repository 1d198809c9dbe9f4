"""bench/gpu_check.sh's table: reads the parts' output on stdin, prints one row per result at once.

Input lines it reads (everything else is ignored; gpu_check.sh keeps it in its log):
    @result {"part": "step", ...}     bench/step_throughput.py --result-lines (one per variant)
    @result {"part": "search", ...}   bench/gpu_search.py --result-lines
    @result {"part": "vocab", ...}    bench/vocab_memory.py --result-lines (one per vocabulary)
    @result {"part": "served", "group": G, ...}   bench/served_teacher.py --result-lines (G: run, memory,
                                      step, on_policy)
    @result {"part": LABEL, "timed_out_s": N} / {"part": LABEL, "exit_code": N} / {"part": "setup", "note": ..}
                                      gpu_check.sh itself
    ===== 3 passed, 1 skipped in 20.1s =====   pytest's closing line (part d)

Each row: part, check, result, goal, verdict. The verdict is "met" / "NOT met" against the GPU
targets, "n/a (CPU)" for figures measured on a CPU (the smoke mode), "TIMEOUT" / "FAILED" for a
part that did not finish. The step rows remember the seed's figures to compare tune_kd's with.
"""

from __future__ import annotations

import json
import re
import sys

COLUMNS = (("part", 4), ("check", 34), ("result", 84), ("goal", 27), ("verdict", 0))
PART_LETTERS = {"setup": "-", "step_eager": "a,b", "step_compiled": "a,b", "search": "c", "pytest": "d", "vocab": "e",
                "served": "f"}
STEP_SPEEDUP_GOAL, MFU_GOAL, CACHED_SPEEDUP_GOAL, PROBE_TOLERANCE = 8.0, 0.30, 2.0, 0.25
FUSED_MEMORY_GOAL, FUSED_TIME_GOAL = 0.25, 1.0     # fused/full peak memory and step time at a real vocabulary
SERVED_STEP_GOAL = 1.2      # served/own trial step time, judged only where the own-teacher run fits (measurable)
# pytest's closing line, with or without its rule of "=" (-q drops it)
PYTEST_SUMMARY = re.compile(r"^=*\s*(?P<summary>\d+ (?:passed|failed|skipped|errors?|deselected|warnings?)\b"
                            r"[\w, ]* in [\d.]+s(?: \([\d:]+\))?)\s*=*$")


def format_row(*cells: str) -> str:
    return " ".join(str(cell).ljust(width) for cell, (_, width) in zip(cells, COLUMNS)).rstrip()


def header() -> str:
    return format_row(*(name for name, _ in COLUMNS)) + "\n" + "-" * 170


def verdict(ok: bool, on_cpu: bool) -> str:
    return "n/a (CPU)" if on_cpu else "met" if ok else "NOT met"


class Table:
    """Turns result records into rows; keeps what later rows compare with (the seed's, the live step's)."""

    def __init__(self):
        self.seed: dict | None = None
        self.live: dict[bool, dict] = {}      # compile on/off -> tune_kd's live-teacher step

    def rows(self, line: str) -> list[str]:
        line = line.rstrip("\n")
        summary = PYTEST_SUMMARY.match(line)
        if summary:
            return [self.pytest_row(summary["summary"])]
        if not line.startswith("@result "):
            return []
        try:
            record = json.loads(line[len("@result "):])
        except ValueError:
            return [format_row("?", "unreadable result line", line[:66], "", "FAILED")]
        if "timed_out_s" in record:
            return [format_row(PART_LETTERS.get(record["part"], "?"), f"{record['part']}: stopped",
                               f"timed out after {record['timed_out_s']} s", "", "TIMEOUT")]
        if "exit_code" in record:
            return [format_row(PART_LETTERS.get(record["part"], "?"), f"{record['part']}: stopped",
                               f"exit code {record['exit_code']} (see the log)", "", "FAILED")]
        if record["part"] == "setup":
            return [format_row("-", "setup", record["note"], "", "")]
        if record["part"] == "step":
            return [self.step_row(record)]
        if record["part"] == "search":
            return self.search_rows(record)
        if record["part"] == "vocab":
            return [self.vocab_row(record)]
        if record["part"] == "served":
            return [self.served_row(record)]
        return [format_row("?", f"unknown part {record['part']!r}", "", "", "FAILED")]

    def step_row(self, r: dict) -> str:
        on_cpu = r["device"].startswith("CPU")
        compiled = "compile on" if r["compile"] else "compile off"
        figures = f"{r['ms']:.1f} ms/step, {r['real_tok_s']:,.0f} real tok/s"
        figures += f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ", MFU n/a"
        figures += f", {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ", peak n/a"
        if r["compile"]:
            figures += f", compile {r['compile_s']:.1f} s ({r['graphs']} graphs)"
        if r["variant"] == "seed":
            self.seed = r
            return format_row("a", "step: seed", figures, "(the baseline)", "measured" if not on_cpu else "n/a (CPU)")
        if r["variant"] == "tune_kd":
            self.live[r["compile"]] = r
            if self.seed is None:
                return format_row("a", f"step: tune_kd, {compiled}", figures, "", "no seed row to compare")
            speedup = r["real_tok_s"] / self.seed["real_tok_s"]
            ok = speedup >= STEP_SPEEDUP_GOAL and (r["mfu"] or 0) >= MFU_GOAL and \
                (r["peak_gib"] or 0) <= (self.seed["peak_gib"] or 0)
            return format_row("a", f"step: tune_kd, {compiled}", f"{speedup:.2f}x seed; {figures}",
                              f">={STEP_SPEEDUP_GOAL:g}x, MFU>={MFU_GOAL:.0%}, <=seed GiB", verdict(ok, on_cpu))
        live = self.live.get(r["compile"])
        if live is None:
            return format_row("b", f"step: cached teacher, {compiled}", figures, "", "no live row to compare")
        speedup = r["real_tok_s"] / live["real_tok_s"]
        return format_row("b", f"step: cached teacher, {compiled}", f"{speedup:.2f}x live; {figures}",
                          f">={CACHED_SPEEDUP_GOAL:g}x the live step", verdict(speedup >= CACHED_SPEEDUP_GOAL, on_cpu))

    @staticmethod
    def search_rows(r: dict) -> list[str]:
        on_cpu = r["device"] == "cpu"
        probe = r["probe_gib"]
        share = f"{r['share']:g} of a GPU" + (f" (probe {probe:.3f} GiB of {r['gpu_total_gib']:.0f} GiB)"
                                               if probe is not None else " (no GPU: nothing probed)")
        rows = [format_row("c", "gpu_per_trial auto", share, "", "measured" if not on_cpu else "n/a (CPU)"),
                format_row("c", "trials at once", f"{r['peak_running']} (max_concurrent {r['parallel']}), "
                           f"search {r['seconds']:.0f} s", f">={r['goal']} on one GPU",
                           verdict(r["peak_running"] >= r["goal"], on_cpu))]
        for trial, real in r["trial_peak_gib"].items():
            if real is None or probe is None:
                rows.append(format_row("c", f"trial {trial} peak vs probe", "no GPU figure (gpu_peak_gib is NaN off "
                                       "CUDA)", f"within {PROBE_TOLERANCE:.0%}", "n/a (CPU)"))
                continue
            ratio = probe / real
            rows.append(format_row("c", f"trial {trial} peak vs probe", f"real {real:.3f} GiB, probe {probe:.3f} GiB: "
                                   f"probe/real {ratio:.2f}", f"within {PROBE_TOLERANCE:.0%}",
                                   verdict(abs(ratio - 1) <= PROBE_TOLERANCE, on_cpu)))
        return rows

    @staticmethod
    def vocab_row(r: dict) -> str:
        ok = r["memory_ratio"] <= FUSED_MEMORY_GOAL and r["time_ratio"] <= FUSED_TIME_GOAL
        figures = (f"fused/full memory {r['memory_ratio']:.3f} ({r['fused_gib']:.2f} / {r['full_gib']:.2f} GiB), "
                   f"time {r['time_ratio']:.3f}, loss diff {r['loss_rel_diff']:.1e}")
        return format_row("e", f"fused head, V={r['vocab']}, {r['positions']} pos", figures,
                          f"memory<={FUSED_MEMORY_GOAL:g}, time<={FUSED_TIME_GOAL:g}",
                          verdict(ok, r["device"].startswith("CPU")))

    @staticmethod
    def served_row(r: dict) -> str:
        on_cpu, group = r["device"].startswith("CPU"), r.get("group")
        if group == "run":
            size = f"{r['teacher_gib']:.1f} GiB" if r["teacher_gib"] >= 0.1 else f"{r['teacher_gib'] * 1024:.2f} MiB"
            return format_row("f", f"served: {r['trials']} trials, teacher {size}",
                              f"completed in {r['seconds']:.0f} s; step {r['served_step_s']:.3f} s; occupancy "
                              f"{r['occupancy']:.2f} ({r['requests']} requests / {r['forwards']} forwards)",
                              "completes; occupancy > 1", verdict(r["occupancy"] > 1, on_cpu))
        if group == "memory" and r["measure"] == "cuda":
            server = r["server_peak_gib"]
            own = f"measured {r['own_measured_gib']:.1f}" if r["own_measured_gib"] is not None else "computed, not run"
            return format_row("f", "served: peak GPU memory, summed",
                              f"{r['sum_gib']:.1f} of {r['gpu_total_gib']:.1f} GiB (trials {sum(r['trial_peak_gib']):.2f} + "
                              f"server {'n/a' if server is None else f'{server:.1f}'}); {len(r['trial_peak_gib'])} own "
                              f"copies {r['own_copies_gib']:.1f} GiB: {own}", "sum <= the GPU's total",
                              verdict(server is not None and r["sum_gib"] <= r["gpu_total_gib"], on_cpu))
        if group == "memory":
            return format_row("f", "served: teacher memory (PSS)", f"the teacher adds {r['served_gib']:.2f} GiB served, "
                              f"{r['own_gib']:.2f} GiB own: served/own {r['ratio']:.2f}", "", "n/a (CPU)")
        if group == "step" and r["ratio"] is None:
            return format_row("f", "served: step vs own teacher", f"served {r['served_step_s']:.3f} s; own teachers "
                              "not run (do not fit): not measurable", f"<={SERVED_STEP_GOAL:g}x own, if measurable",
                              "n/a (not measurable)")
        if group == "step":
            return format_row("f", "served: step vs own teacher", f"served/own {r['ratio']:.2f} "
                              f"({r['served_step_s']:.3f} s vs {r['own_step_s']:.3f} s)", f"<={SERVED_STEP_GOAL:g}x own",
                              verdict(r["ratio"] <= SERVED_STEP_GOAL, on_cpu))
        if group == "on_policy":
            return format_row("f", "served: on-policy / cached batch", f"{r['served']:.2f} served teacher, "
                              f"{r['own']:.2f} own teacher", "", "n/a (CPU)" if on_cpu else "measured")
        return format_row("f", f"served: unknown group {group!r}", "", "", "FAILED")

    @staticmethod
    def pytest_row(summary: str) -> str:
        failed = re.search(r"\d+ (failed|errors?)", summary) is not None
        ran = re.search(r"\d+ (passed|failed)", summary) is not None
        state = "FAILED" if failed else "met" if ran else "n/a (all skipped: no GPU)"
        return format_row("d", "pytest -m gpu", summary, "all pass", state)


def main() -> int:
    table = Table()
    print(header(), flush=True)
    for line in sys.stdin:
        for row in table.rows(line):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
