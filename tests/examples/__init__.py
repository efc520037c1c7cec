"""The examples/ folder: a user's own package and config directory, run as a user would."""
