"""``python -m fprnn.mazes``: the command of [`fprnn.data.mazes`][fprnn.data.mazes], kept at the package root."""
from fprnn.data.mazes import main

if __name__ == "__main__":
    main()
