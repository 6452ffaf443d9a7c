"""``python -m fprnn.mazes``: the command of [`fprnn.tools.mazes`][fprnn.tools.mazes], kept at the package root."""
from fprnn.tools.mazes import main

if __name__ == "__main__":
    main()
