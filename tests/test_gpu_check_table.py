"""bench/gpu_check_table.py: result lines from the parts become rows judged against the GPU goals."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("gpu_check_table",
                                              Path(__file__).resolve().parents[1] / "bench" / "gpu_check_table.py")
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
