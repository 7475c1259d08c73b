"""Mode bits and owners shown to the kernel, which enforces them (default_permissions)."""

from __future__ import annotations

from dataclasses import dataclass

from kvpfs.wire.protocol import Pool


@dataclass(frozen=True)
class Permissions:
    """`external` (pool 0) often carries secrets (user data, keys): root only by
    default. `guest` is writable by its owner and, if set, by `guest_gid`.
    """

    uid: int = 0
    gid: int = 0
    guest_gid: int | None = None
    external_readable: bool = False

    def dir_mode(self, pool: int) -> int:
        if pool == Pool.GUEST:
            return 0o775 if self.guest_gid is not None else 0o755
        if pool == 0 and not self.external_readable:
            return 0o500
        return 0o555

    def file_mode(self, pool: int) -> int:
        if pool == Pool.GUEST:
            return 0o664 if self.guest_gid is not None else 0o644
        if pool == 0 and not self.external_readable:
            return 0o400
        return 0o444

    def group(self, pool: int) -> int:
        return self.guest_gid if pool == Pool.GUEST and self.guest_gid is not None else self.gid
