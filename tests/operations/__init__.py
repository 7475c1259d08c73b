"""The pyfuse3 operations called directly, without a mount (the s3ql way)."""
