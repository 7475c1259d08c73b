"""What crosses a boundary, as pure data: the device's bytes, the kernel's limits, key names.

Nothing here does I/O or imports the rest of kvpfs, so every module can be tested with bytes alone.
"""
