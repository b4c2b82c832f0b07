"""Helpers outside the model: pictures (`visualization`), what sets float results (`numerics`)."""
