"""Benchmarks you can rerun (`sip bench shard|rewrite|judge|train`): each sip stage or the
trainer against the bare library doing the same work, in the same run, on the same machine.

``fresh_process`` runs a side (a stage as the user runs it, or a bare engine or loop) in a
process of its own and times it; ``pairs`` makes the small input table the LLM benchmarks share.
"""
