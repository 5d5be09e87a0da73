"""Streaming data over token shards, mixtures, packing, and the DeepSpeed trainer."""
