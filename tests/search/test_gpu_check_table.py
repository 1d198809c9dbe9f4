"""bench/gpu_check_table.py: result lines from the parts become rows judged against the GPU goals."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("gpu_check_table",
                                              Path(__file__).resolve().parents[2] / "bench" / "gpu_check_table.py")
gpu_check_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check_table)


def step(variant, tok_s, compile_on=False, mfu=0.35, peak_gib=10.0, device="NVIDIA H100 80GB HBM3"):
    return "@result " + json.dumps({"part": "step", "variant": variant, "compile": compile_on, "device": device,
                                    "ms": 100.0, "real_tok_s": tok_s, "tflops": 1.0, "mfu": mfu,
                                    "peak_gib": peak_gib, "compile_s": 42.0 if compile_on else None,
                                    "graphs": 3 if compile_on else None})


def rows(*lines):
    table = gpu_check_table.Table()
    return [row for line in lines for row in table.rows(line)]


def test_step_rows_compare_tune_kd_with_the_seed_and_cached_with_live():
    out = rows(step("seed", 1000.0, mfu=0.05, peak_gib=20.0), step("tune_kd", 9000.0),
               step("cached", 20000.0), step("tune_kd", 7000.0, compile_on=True), "some log line")
    assert len(out) == 4
    assert "9.00x seed" in out[1] and out[1].endswith(" met")
    assert "2.22x live" in out[2] and out[2].endswith(" met")
    assert "7.00x seed" in out[3] and "compile 42.0 s" in out[3] and out[3].endswith("NOT met")


def test_figures_from_a_cpu_are_not_judged():
    out = rows(step("seed", 1000.0, device="CPU (2 threads)", mfu=None, peak_gib=None),
               step("tune_kd", 500.0, device="CPU (2 threads)", mfu=None, peak_gib=None))
    assert all(r.endswith("n/a (CPU)") for r in out) and "peak n/a" in out[1]


def test_search_rows_judge_concurrency_and_the_probe_per_trial():
    record = {"part": "search", "device": "NVIDIA H100", "share": 0.125, "parallel": 4, "peak_running": 4, "goal": 4,
              "probe_gib": 1.0, "gpu_total_gib": 80.0, "trial_peak_gib": {"a": 0.9, "b": 0.5}, "seconds": 60.0}
    out = rows("@result " + json.dumps(record))
    assert "0.125 of a GPU (probe 1.000 GiB of 80 GiB)" in out[0]
    assert out[1].endswith(" met")
    assert "probe/real 1.11" in out[2] and out[2].endswith(" met")
    assert "probe/real 2.00" in out[3] and out[3].endswith("NOT met")


def test_stopped_parts_and_pytest_summaries_become_rows():
    out = rows('@result {"part": "step_compiled", "timed_out_s": 150}', '@result {"part": "search", "exit_code": 1}',
               "========== 4 passed, 1 failed in 31.20s ==========", "3 skipped, 170 deselected in 2.50s")
    assert "step_compiled: stopped" in out[0] and "timed out after 150 s" in out[0] and out[0].endswith("TIMEOUT")
    assert out[1].startswith("c ") and out[1].endswith("FAILED")
    assert "4 passed, 1 failed" in out[2] and out[2].endswith("FAILED")
    assert out[3].endswith("n/a (all skipped: no GPU)")


def test_vocab_rows_judge_the_fused_heads_memory_and_time():
    record = {"part": "vocab", "device": "NVIDIA H100", "vocab": 151936, "positions": 4096, "memory_ratio": 0.12,
              "time_ratio": 0.8, "fused_gib": 0.3, "full_gib": 2.5, "loss_rel_diff": 1e-7}
    slow = dict(record, time_ratio=1.3)
    on_cpu = dict(record, device="CPU (2 threads)")
    out = rows(*("@result " + json.dumps(r) for r in (record, slow, on_cpu)))
    assert "V=151936" in out[0] and "memory 0.120 (0.30 / 2.50 GiB)" in out[0] and out[0].endswith(" met")
    assert out[1].endswith("NOT met") and out[2].endswith("n/a (CPU)")


def served(group, device="NVIDIA H100 80GB HBM3", **figures):
    return "@result " + json.dumps({"part": "served", "device": device, "group": group, **figures})


RUN = {"trials": 4, "steps": 3, "teacher": "Llama h5120 x 40", "teacher_gib": 23.4, "served_step_s": 1.25,
       "occupancy": 3.5, "requests": 14, "forwards": 4, "seconds": 41.0}
GPU_MEMORY = {"measure": "cuda", "trial_peak_gib": [0.3, 0.3, 0.3, 0.3], "server_peak_gib": 25.0, "sum_gib": 26.2,
              "reserved_sum_gib": 27.0, "gpu_total_gib": 79.2, "own_copies_gib": 93.6, "own_measured_gib": None}


def test_served_rows_on_a_gpu_judge_completion_occupancy_and_the_summed_peak():
    out = rows(served("run", **RUN), served("memory", **GPU_MEMORY),
               served("step", served_step_s=1.25, own_step_s=None, ratio=None))
    assert all(r.startswith("f ") for r in out)
    assert "4 trials, teacher 23.4 GiB" in out[0] and "occupancy 3.50 (14 requests / 4 forwards)" in out[0]
    assert out[0].endswith(" met")
    assert "26.2 of 79.2 GiB (trials 1.20 + server 25.0)" in out[1] and "4 own copies 93.6 GiB: computed, not run" in out[1]
    assert out[1].endswith(" met")
    assert "not measurable" in out[2] and out[2].endswith("n/a (not measurable)")


def test_served_rows_fail_without_batching_or_past_the_gpu_or_slower_than_own_teachers():
    out = rows(served("run", **dict(RUN, occupancy=1.0, requests=12, forwards=12)),
               served("memory", **dict(GPU_MEMORY, sum_gib=80.0)),
               served("memory", **dict(GPU_MEMORY, server_peak_gib=None)),
               served("step", served_step_s=1.5, own_step_s=1.0, ratio=1.5),
               served("step", served_step_s=1.1, own_step_s=1.0, ratio=1.1))
    assert [r.endswith("NOT met") for r in out] == [True, True, True, True, False]
    assert "server n/a" in out[2] and "served/own 1.50 (1.500 s vs 1.000 s)" in out[3] and out[4].endswith(" met")


def test_served_rows_from_a_cpu_are_not_judged():
    cpu = "CPU (2 threads)"
    out = rows(served("run", device=cpu, **dict(RUN, teacher_gib=0.0002)),
               served("memory", device=cpu, measure="pss", own_gib=0.02, served_gib=0.3, ratio=15.0),
               served("step", device=cpu, served_step_s=0.7, own_step_s=0.2, ratio=3.5),
               served("on_policy", device=cpu, served=1.8, own=2.4))
    assert all(r.endswith("n/a (CPU)") for r in out)
    assert "teacher 0.20 MiB" in out[0] and "served/own 15.00" in out[1] and "1.80 served teacher" in out[3]


def test_a_stopped_served_part_is_row_f():
    out = rows('@result {"part": "served", "timed_out_s": 90}', '@result {"part": "served", "exit_code": 1}')
    assert out[0].startswith("f ") and "served: stopped" in out[0] and "timed out after 90 s" in out[0]
    assert out[0].endswith("TIMEOUT")
    assert out[1].startswith("f ") and "exit code 1" in out[1] and out[1].endswith("FAILED")
