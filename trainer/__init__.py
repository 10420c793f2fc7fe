"""The LitGPT-based trainer that consumes sip's preference tables."""
