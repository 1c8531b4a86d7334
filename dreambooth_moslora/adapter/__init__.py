"""The adapter library: MoSLoRA's config, math, layer, injection and file formats, what a diffusers user imports.

Needs torch and safetensors only (transformers where a text encoder is loaded); never the trainer or the verbs.
See docs/architecture.md.
"""
