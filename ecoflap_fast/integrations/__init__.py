"""Backends for other pruning libraries: their algorithms, this engine's ops.

``ecoflap_fast.integrations.llmcompressor``: llm-compressor's Wanda and SparseGPT modifiers.
"""
