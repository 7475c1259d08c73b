"""The emulation floor: a KVP "daemon" that answers every request at once.

Run as its own process (the benchmark starts it)::

    python bench/nulldaemon.py DEVICE

It registers like hv_kvp_daemon and then loops exactly as the daemon does
(poll, read one message, write one reply) but answers every request with
HV_S_OK and no data, looking nothing up. The time a host transaction takes
against it is what the emulated device, the host's control socket and the
scheduler cost, before any daemon does any work.
"""

from __future__ import annotations

import os
import select
import signal
import sys

from kvpfs.wire.protocol import MESSAGE_SIZE, Op, Status, encode_register, encode_status


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: nulldaemon.py DEVICE", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd = os.open(argv[0], os.O_RDWR | os.O_CLOEXEC)
    os.write(fd, encode_register(Op.REGISTER1))
    os.read(fd, MESSAGE_SIZE)  # the registration reply
    reply = encode_status(Status.S_OK)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        poller.poll()
        os.read(fd, MESSAGE_SIZE)
        os.write(fd, reply)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
