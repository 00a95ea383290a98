"""``python -m miroflow`` entry point."""

from miroflow.cli import app

if __name__ == "__main__":
    app()
