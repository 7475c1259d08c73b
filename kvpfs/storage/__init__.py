"""The pool files: records on disk, their locks and journal, and the pools kept in memory.

Storage knows nothing of FUSE or of the host: both reach the pools through `store.Store`.

From the bytes up: `records` (one 2560-byte record), `poolrecords` (a pool's records with
their last-wins index), `writeplan` (what an upsert or delete writes), `errors`, `files`
(checked I/O), `locks` (OFD + flock), `journal` (crash redo), `room` (space reserved ahead),
`poolfile` (one pool file, locked and changed in place), `readonly` (reading for the tools),
`worker` (a thread per pool), `store` (the five pools in memory, in step with the files).
"""
