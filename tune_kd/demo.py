"""`python -m tune_kd.demo`: the same command as `tune-kd demo` (tune_kd/cli/demo.py)."""

from tune_kd.cli import demo

if __name__ == "__main__":
    raise SystemExit(demo.main())
