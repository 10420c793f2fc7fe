"""Batch stages of the sip pipeline, one module per stage, each a datatrove pipeline step."""
