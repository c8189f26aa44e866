"""The one error type loaders raise, so callers can catch bad model files in one place."""


class WeightLoadError(ValueError):
    """A model file is missing, truncated, corrupt, or does not match its config."""
