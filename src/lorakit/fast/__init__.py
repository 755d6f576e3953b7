"""Speed options that compute the same function faster: shared projections, per-layer compile, activation
checkpointing, fused linear cross-entropy. Imports core only.
"""
