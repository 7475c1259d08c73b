"""The `kvpfs` command: mounting, the scripting commands on pool files, and `kvpfs host`."""
