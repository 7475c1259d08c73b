"""Pool files, the store and the device server in-process, through real files and the real
byte protocol."""
