"""Layer 4, adapter files: lorakit's own format, PEFT export and import, describing a saved adapter.
"""
