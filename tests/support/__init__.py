"""Test helpers: the emulated hv_kvp device, the scripted host and the reference daemon."""
