"""Bridges to other libraries, each behind its optional extra (``kdcore.integrations.transformers``)."""
