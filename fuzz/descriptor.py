"""atheris harness: ``python fuzz/descriptor.py -max_total_time=60`` (see fuzz/harness.py)."""

from harness import main

if __name__ == "__main__":
    main("descriptor")
