"""``python -m fprnn.figures``: the command of [`fprnn.analysis.figures`][fprnn.analysis.figures], kept at the package root."""
from fprnn.analysis.figures import main

if __name__ == "__main__":
    main()
