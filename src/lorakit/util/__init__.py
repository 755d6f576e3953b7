"""Leaf helpers every layer may use: atomic files, JSONL, bundled resources, validation messages.

Nothing here imports torch or any other lorakit module but :mod:`lorakit.errors`.
"""
