"""Paper-ready figures. Reads only the stages' output files (through the owning wings'
readers) and never imports torch."""
