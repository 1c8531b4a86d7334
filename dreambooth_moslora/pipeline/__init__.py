"""SDXL around the adapter: loading a base model (a folder, a single file), its objective, generating and measuring
images. Used by the trainer and by the verbs; imports only the adapter library. See docs/architecture.md.
"""
