"""Model import, compilation, tuning and the tuning database."""
