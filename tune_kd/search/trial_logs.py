"""Every attempt's log lines kept: a trial run again must not overwrite the logs of its earlier attempt.

Ray writes a trial's stdout.log and stderr.log (progress.TRIAL_LOG_FILES) into the trial's working
directory, a local folder of the Ray session (/tmp/ray/session_*/artifacts/.../working_dirs/
trial_<id>), appending, and copies that folder over the trial's folder on storage at each report
and at the trial's end. A trial that runs again in a fresh working directory (resumed by --resume
after Ctrl-C or a kill, in a new Ray session; or retried on another node after an error) starts
new, empty logs there, and the first copy would replace the earlier attempt's logs on storage.

keep_earlier_attempts, called at the start of every trial, first renames such a stored log to the
next free stderr.1.log, stderr.2.log, ... (numbered in the order the attempts ran; stderr.log is
always the latest). A retry in the same working directory appends to the log Ray already holds,
which carries the earlier attempt: nothing is renamed then.
"""

from __future__ import annotations

from pathlib import Path

from tune_kd.search.progress import TRIAL_LOG_FILES

HEAD_BYTES = 1 << 16   # enough of a log to tell whether one file continues another


def keep_earlier_attempts(trial_dir: Path, working_dir: Path, names: tuple[str, ...] = TRIAL_LOG_FILES) -> list[Path]:
    """Rename each log in trial_dir (storage) that the log of the same name in working_dir does not
    continue to its next free numbered name; returns the new paths."""
    kept = []
    for name in names:
        stored, local = Path(trial_dir) / name, Path(working_dir) / name
        if not stored.is_file() or stored.stat().st_size == 0 or continues(local, stored):
            continue
        stem, suffix = stored.name.rsplit(".", 1) if "." in stored.name else (stored.name, "")
        number = 1
        while (stored.parent / f"{stem}.{number}.{suffix}").exists():
            number += 1
        target = stored.parent / f"{stem}.{number}.{suffix}"
        stored.rename(target)
        kept.append(target)
    return kept


def continues(local: Path, stored: Path) -> bool:
    """Whether local holds stored's lines and maybe more (the same attempt's log, or the same file:
    storage on the working directory's own disk). True when there is no local log: nothing would
    be copied over the stored one."""
    if not local.is_file() or local.resolve() == stored.resolve():
        return True
    size = stored.stat().st_size
    if local.stat().st_size < size:
        return False
    length = min(size, HEAD_BYTES)
    with local.open("rb") as mine, stored.open("rb") as theirs:
        return mine.read(length) == theirs.read(length)
