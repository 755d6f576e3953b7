"""Layer 3, adapting a model: attach, merge, unmerge, remove, detach, choosing target modules; the records of
what is attached where. Imports methods and core.
"""
