"""Test helpers: waiting, lock holders, pool writers and safety figures (the device and host
emulation shared with bench/ is the top-level `emulation` package)."""
