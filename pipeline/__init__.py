"""Everything before the GPU: sources, download, filters, preprocessing, VQ/text tokenization, shards.

Modules are imported explicitly (`from pipeline.ingest import ...`); this file imports nothing heavy.
"""
