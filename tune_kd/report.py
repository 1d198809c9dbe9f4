"""`python -m tune_kd.report`: the same command as `tune-kd report` (tune_kd/cli/report.py)."""

from tune_kd.cli import report

if __name__ == "__main__":
    raise SystemExit(report.main())
