"""Prompt-CAM trait discovery per taxonomic rank."""

__version__ = "0.1.0"
