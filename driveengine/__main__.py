"""``python -m driveengine``: the ``driveengine`` command (the same as the console script)."""

from driveengine.cli import main

if __name__ == "__main__":
    main()
