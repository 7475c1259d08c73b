"""kvpfs benchmark (run `bench/run.py`; not part of the test suite)."""
