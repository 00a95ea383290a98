"""miroflow."""
