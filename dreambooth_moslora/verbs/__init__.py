"""The commands: the CLI and the verbs behind it (generate and plan come from the layers below, evaluate and inspect
live here). The top layer: nothing in the package imports it. See docs/architecture.md.
"""
