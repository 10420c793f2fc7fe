"""sip: Self-Improving Pretraining. The framework every stage stands on."""

__version__ = "0.1.0"
