"""Integrations with other libraries (timm)."""
