"""Whole kvpfs processes: services, crashes, the reference daemon, the command-line tools,
and other programs sharing the pool files."""
