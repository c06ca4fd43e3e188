"""The main job's parts: offline text data, a small byte-level transformer, and the report."""
