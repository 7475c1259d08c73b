"""kvpfs: Hyper-V KVP (Data Exchange) pools as a FUSE filesystem."""

__version__ = "0.2.0"
