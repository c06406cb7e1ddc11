"""peftcore's Apache SINGA backend. Importing this package does not import singa."""
