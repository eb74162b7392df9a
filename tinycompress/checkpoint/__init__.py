"""Checkpoint folders: their file names and manifest, writing and verifying them, finding them in a
workspace, and saving / loading the Hugging Face model files inside."""
