"""Benchmark harness: measured latency, memory and KV cache next to the analytic FLOPs (``tokenprune bench``).

``run`` (prefill/decode/TTFT/peak memory/KV, unpruned vs pruned vs the physical limit), ``models`` (presets with
real shapes and random weights, or checkpoints), ``selection`` (selector micro-benchmark), ``report`` (table,
JSON, CSV) and ``cli`` (the ``flops``, ``bench`` and ``bench-selection`` commands).
"""
