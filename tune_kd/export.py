"""`python -m tune_kd.export`: the same command as `tune-kd export` (tune_kd/cli/export.py)."""

from tune_kd.cli import export

if __name__ == "__main__":
    raise SystemExit(export.main())
