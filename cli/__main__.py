"""`python -m cli …`: the `salesdash` CLI without the installed script."""

from cli.main import app

if __name__ == "__main__":
    app()
