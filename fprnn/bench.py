"""``python -m fprnn.bench``: the command of [`fprnn.tools.bench`][fprnn.tools.bench], kept at the package root."""
from fprnn.tools.bench import main

if __name__ == "__main__":
    main()
