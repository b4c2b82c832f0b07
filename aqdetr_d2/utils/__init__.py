"""Helpers outside the model: pictures (`visualization`)."""
