"""The pool files: records on disk, their locks and journal, and the pools kept in memory.

Storage knows nothing of FUSE or of the host: both reach the pools through `store.Store`.
"""
