"""Bytes and source alone: the codec, names, write plan, IP-info text, intrinsic values,
and the house's rules."""
