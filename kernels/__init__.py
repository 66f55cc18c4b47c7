"""Fused ops: one op, several implementations. Knows nothing about graphs."""
