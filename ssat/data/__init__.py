"""Data sets on disk loaded into uint8 arrays."""
