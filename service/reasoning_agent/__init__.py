"""reasoning-agent: a small, exact LLM task service."""

__version__ = "0.1.0"
