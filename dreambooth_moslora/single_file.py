"""The path that the model cards of single-file bases name (`from dreambooth_moslora.single_file import
load_single_file_components`), kept so that cards already written keep working; the code is in pipeline/single_file.py."""

from .pipeline.single_file import load_single_file_components

__all__ = ["load_single_file_components"]
