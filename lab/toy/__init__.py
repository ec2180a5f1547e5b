"""Builtin toy hybrids and the data they are trained and measured on."""
