"""`python -m tune_kd.prepare`: the same command as `tune-kd prepare` (tune_kd/cli/prepare.py)."""

from tune_kd.cli import prepare

if __name__ == "__main__":
    raise SystemExit(prepare.main())
