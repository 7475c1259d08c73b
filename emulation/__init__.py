"""The emulated `/dev/vmbus/hv_kvp`, a scripted Hyper-V host and Debian's hv_kvp_daemon.

Shared by the tests and the benchmarks (so it lives beside both, not inside either): the
emulated device is a FUSE file that speaks the kernel's side of the protocol, so kvpfs and
the reference daemon can be run, compared and timed against the same host.
"""
