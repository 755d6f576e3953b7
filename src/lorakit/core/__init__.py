"""Layer 1, the contract: what an adapter is (Adapter, AdapterConfig), the layer that wraps a base Linear,
Conv1D or Embedding, the fused low-rank op, training callbacks and the two collectives methods need.

Imports nothing of lorakit above it (only errors and util).
"""
