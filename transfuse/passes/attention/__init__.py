"""Attention passes: mask analysis (masks.py), the fusion rules that use it (fuse.py) and
their helpers."""
