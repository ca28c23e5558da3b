"""``python -m surgery``: the ``surgery`` command."""

from surgery.cli import main

if __name__ == "__main__":
    main()
