"""Pipeline stages: plain functions that read artifacts and write artifacts into an output folder."""
