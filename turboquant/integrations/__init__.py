"""Integrations with model frameworks (optional dependencies): ``turboquant.integrations.transformers``."""
