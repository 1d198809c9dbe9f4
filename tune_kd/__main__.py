"""`python -m tune_kd <command>`: the same as `tune-kd <command>` (tune_kd/cli/main.py)."""

from tune_kd.cli import main

if __name__ == "__main__":
    raise SystemExit(main.main())
