"""The filesystem: pyfuse3 operations over the store, one pool a directory, one key a file."""
