"""Bridges to other libraries: ``kdcore.integrations.transformers`` (behind the optional
``transformers`` extra) and ``kdcore.integrations.generation`` (prompts continued by a model's
``generate``, for the generation-based methods; it imports no optional package itself)."""
