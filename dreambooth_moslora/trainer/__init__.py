"""The trainer: options, data, caches, prior preservation, the step, checkpoints, validation and the loop.

Imports the adapter library and the pipelines, never the verbs. See docs/architecture.md.
"""
