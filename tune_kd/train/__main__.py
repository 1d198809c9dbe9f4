"""`python -m tune_kd.train`: the same command as `tune-kd train` (tune_kd/cli/train.py)."""

from tune_kd.cli import train

if __name__ == "__main__":
    raise SystemExit(train.main())
