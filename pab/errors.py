"""Exceptions every layer shares. Light on purpose: the Ray side imports it without importing torch."""


class GenerationCancelled(RuntimeError):
    """A generation stopped because it was asked to: by the pipeline's `should_cancel`, by one rank of a group
    (every rank then stops at the same step), or by the group as a whole. One class from the denoising loop up
    to the job record, so every layer recognises a cancel the same way."""
