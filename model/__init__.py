"""The SynerGen-VL model: MMoE decoder on transformers' Qwen2, token folding, unfolding head, VQ wrappers.

`model` imports neither `pipeline` nor `train`.
"""
