"""bench/vs_trl.py --smoke: tune_kd against TRL's trainers on tiny models end to end, in a subprocess.

TRL is only in the `bench` extra (pip install -e ".[bench]"), never in core or `test`, so without it
this test skips. The smoke run builds its own 6,400-id tokenizer (no ../shared needed) and must
print every ratio line for V=6400 and pass the first-step loss check: tune_kd's live and cached
losses equal TRL GKD's on the same first batch within 1e-4 relative (the bench exits non-zero
otherwise, so a check that fails cannot print the lines)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_prints_every_ratio_and_passes_the_loss_check():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "vs_trl.py"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    for line in ("tune_kd live/TRL GKD tokens/s at V=6400", "tune_kd cached/TRL GKD tokens/s at V=6400",
                 "tune_kd/TRL GKD peak memory at V=6400", "tune_kd/TRL on-policy samples/s"):
        assert re.search(rf"^{re.escape(line)}: \d+\.\d\d$", out, re.M), f"missing: {line}\n{out}"
    assert "first-step losses equal within 0.0001 relative" in out and ": passed" in out
    assert "V=151936" not in out   # --smoke is V=6400 only
