"""`python -m tune_kd.search`: the same command as `tune-kd search` (tune_kd/cli/search.py)."""

from tune_kd.cli import search

if __name__ == "__main__":
    raise SystemExit(search.main())
