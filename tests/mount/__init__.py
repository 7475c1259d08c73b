"""A real FUSE mount driven by real programs (shells, inotify, other users)."""
